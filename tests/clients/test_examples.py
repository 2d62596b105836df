"""The runnable examples in clients/python/examples work against a real authsvc, as their docstrings say."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.clients.conftest import Keys
from tests.clients.test_asgi import request
from tests.support import ROOT, free_port

EXAMPLES = ROOT / "clients" / "python" / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"authsvc_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_grpc_example_serves_and_calls_as_documented(
    target: str, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """``grpc_service.py serve`` runs as a script; its ``call`` command gets allowed and denied answers."""
    listen = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "grpc_service.py"),
        "serve",
        "--authsvc",
        target,
        "--listen",
        listen,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"listening" in line, line
        example = load("grpc_service")
        assert await example.call(listen, keys.reader, "SayHello", "") == 0
        assert await example.call(listen, keys.reader, "Forget", "x") == 1
        assert await example.call(listen, None, "SayHello", "") == 1
        assert await example.call(listen, None, "Ping", "") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"hello alice (org {keys.org}, key {keys.reader[:12]}...)"
        assert out[1].startswith("PERMISSION_DENIED: ")
        assert out[2].startswith("UNAUTHENTICATED: ")
        assert out[3] == "pong"
    finally:
        proc.terminate()
        await proc.wait()


async def test_asgi_example_answers_as_its_docstring_says(
    target: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHSVC_TARGET", target)
    example = load("asgi_app")
    try:
        assert (await request(example.app, "GET", "/healthz")).status == 200
        assert (await request(example.app, "GET", "/projects")).status == 401
        allowed = await request(example.app, "GET", "/projects", [("x-api-key", keys.reader)])
        assert allowed.status == 200
        assert json.loads(allowed.body) == {
            "path": "/projects",
            "method": "GET",
            "org_id": keys.org,
            "user_id": "alice",
            "scopes": ["read"],
            "saw_key_header": False,
        }
        for key, status in [(keys.reader, 403), (keys.writer, 200)]:
            posted = await request(example.app, "POST", "/projects", [("authorization", f"ApiKey {key}")])
            assert posted.status == status
    finally:
        await example.app.client.close()


async def test_cached_authorize_example_decides_a_known_key_in_the_process(target: str, keys: Keys) -> None:
    """``cached_authorize.py TARGET KEY`` as a script: the first answer from authsvc, the next ones local."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "cached_authorize.py"), target, keys.reader, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, lines
    # The very first call went to authsvc before the stream subscribed, so the key is usually learnt by the next.
    assert lines[0] in ("allowed (authsvc)", "allowed (this process)"), lines
    assert lines[1:3] == ["allowed (this process)"] * 2, lines
    assert lines[3].endswith("entries=1 stream=subscribed"), lines
