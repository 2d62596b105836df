"""The client package stands alone: grpcio and protobuf only, and a contract mirror that cannot drift."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from authsvc_client import Reason
from authsvc_client.v1 import authsvc_pb2 as pb

from tests.support import ROOT

CLIENT_DIR = ROOT / "clients" / "python"

# In the child: make every server-only module unimportable, then import and
# use the whole public surface. An import of any of them fails the test.
_ISOLATED = """
import importlib.abc, sys
SERVER_ONLY = {"authsvc", "asyncpg", "pgserver", "redis", "uvloop", "envoy", "xds", "grpc_health", "grpc_reflection"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SERVER_ONLY:
            raise ImportError(f"server-only module imported: {name}")
        return None
sys.meta_path.insert(0, Block())
import authsvc_client
from authsvc_client import AsyncClient, AuthsvcMiddleware, AuthzServerInterceptor, Client
with Client("127.0.0.1:1") as client:
    AuthzServerInterceptor(client, {"/x.Y/Z": "read"})
async def app(scope, receive, send): pass
AuthsvcMiddleware(app, client=AsyncClient("127.0.0.1:1"), scopes=[("*", "/", "read")])
print(sorted(m for m in sys.modules if m.partition(".")[0] in SERVER_ONLY))
"""


def test_client_imports_and_works_without_any_server_module() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-c", _ISOLATED], capture_output=True, text=True, cwd=CLIENT_DIR, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_client_distribution_depends_on_grpcio_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    assert "py.typed" in (CLIENT_DIR / "pyproject.toml").read_text()


def test_reason_mirrors_every_value_of_the_proto_enum() -> None:
    """A reason added to the contract needs a member here too; this fails until it has one."""
    proto = {value.number: value.name.removeprefix("REASON_") for value in pb.Reason.DESCRIPTOR.values}
    assert {r.value: r.name for r in Reason} == proto
