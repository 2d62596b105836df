"""The core does no I/O of its own: it imports no transport, no driver, and never reads the environment.

``authsvc.core`` (and the client package's value types, decision cache and
HTTP policy, which it shares) must import and work with grpc, protobuf,
asyncpg, redis and the other edge packages unimportable, and with
``os.environ`` replaced by a tripwire. The edges (``authsvc.storage``,
``authsvc.grpc``, ``authsvc.extauthz``, ``authsvc.runtime``,
``authsvc.config``) are where those live.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import authsvc.core
from tests.support import ROOT

SHARED_CLIENT_MODULES = ("authsvc_client._decision", "authsvc_client._cache", "authsvc_client._http")
CORE_MODULES = tuple(f"authsvc.core.{m.name}" for m in pkgutil.iter_modules(authsvc.core.__path__))

_ISOLATED = """
import asyncio, collections, dataclasses, datetime, enum, hashlib, importlib.abc, json, logging, math, re
import secrets, sys, unicodedata, uuid, zlib, contextvars, os
EDGES = {"grpc", "google", "asyncpg", "redis", "pgserver", "uvloop", "envoy", "xds", "grpc_health",
         "grpc_reflection", "authsvc_client.v1", "authsvc.storage", "authsvc.grpc", "authsvc.config",
         "authsvc.runtime", "authsvc.extauthz", "authsvc.cli", "tomllib"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in EDGES or name.partition(".")[0] in EDGES or any(name.startswith(e + ".") for e in EDGES):
            raise ImportError(f"the core imported an edge module: {name}")
        return None
class Tripwire(dict):
    def __getitem__(self, key): raise RuntimeError(f"the core read the environment: {key}")
    get = __getitem__
    def __contains__(self, key): raise RuntimeError(f"the core read the environment: {key}")
sys.meta_path.insert(0, Block())
os.environ = Tripwire()
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
# Use the core, not just import it: a decision end to end over the in-process pieces it owns.
from authsvc.core.keys import ApiKey, KeyGrant, ScopeCatalog, decide, Reason
catalog = ScopeCatalog.from_mapping({"scopes": {"read": {}, "write": {"implies": ["read"]}}}, "test")
now = datetime.datetime.now(datetime.UTC)
grant = KeyGrant.of(ApiKey("k", "o", "n", "authsvc_abcd", ("write",), "u", now), catalog)
assert decide(grant, "read", 0.0).reason is Reason.OK
print(sorted(m for m in sys.modules if m.partition(".")[0] in {"grpc", "google", "asyncpg", "redis"}))
"""


def test_the_core_imports_no_transport_driver_or_environment() -> None:
    assert "authsvc.core.authorizer" in CORE_MODULES and "authsvc.core.manager" in CORE_MODULES
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATED, *SHARED_CLIENT_MODULES, *CORE_MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_core_module_reads_the_environment_at_call_time_either() -> None:
    """The import test catches reads at import; this catches a read hidden in a function."""
    for name in (*CORE_MODULES, *SHARED_CLIENT_MODULES):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        source = open(module.__file__ or "", encoding="utf-8").read()  # noqa: SIM115  # a short read
        assert "environ" not in source and "getenv" not in source, name
