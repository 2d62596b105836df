"""Closed management by default: on an address other machines reach, no admin tokens means no start.

``0.0.0.0`` is what the Dockerfile listens on; the tests bind it but only
ever connect to 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, free_port, new_org, serve_process, wait_serving


def run_serve(env: dict[str, str], tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authsvc", "serve", *args],
        env={**os.environ, "AUTHSVC_WORKERS": "1", "AUTHSVC_ADMIN_TOKENS": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
    )


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"AUTHSVC_LISTEN": "0.0.0.0:{port}"}, ()),
        ({"AUTHSVC_LISTEN": "[::]:{port}"}, ()),
        ({}, ("--listen", "0.0.0.0:{port}")),
        ({"AUTHSVC_LISTEN": "0.0.0.0:{port}", "AUTHSVC_INSECURE_MANAGEMENT": "false"}, ()),
    ],
    ids=["any-ipv4", "any-ipv6", "--listen any-ipv4", "insecure=false"],
)
def test_open_management_on_a_reachable_address_refuses_to_start(
    env: dict[str, str], args: tuple[str, ...], tmp_path: Path, database_url: str
) -> None:
    port = str(free_port())
    result = run_serve(
        {"AUTHSVC_DATABASE_URL": database_url, **{k: v.replace("{port}", port) for k, v in env.items()}},
        tmp_path,
        *(a.replace("{port}", port) for a in args),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "AUTHSVC_ADMIN_TOKENS" in lines[0] and "AUTHSVC_INSECURE_MANAGEMENT=true" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_bad_insecure_management_value_names_the_variable(tmp_path: Path) -> None:
    result = run_serve({"AUTHSVC_LISTEN": f"0.0.0.0:{free_port()}", "AUTHSVC_INSECURE_MANAGEMENT": "yes"}, tmp_path)
    assert result.returncode == 2
    assert "AUTHSVC_INSECURE_MANAGEMENT must be true or false" in result.stderr.strip()


def _create(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> pb.CreateKeyResponse:
    with grpc.insecure_channel(target) as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        request = pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"])
        reply: pb.CreateKeyResponse = stub.CreateKey(request, metadata=metadata, timeout=10)
        return reply


def test_with_admin_tokens_it_serves_on_all_interfaces_and_management_needs_one(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_ADMIN_TOKENS": "ops:tok-all-interfaces-0123"}
    with serve_process({**env, "AUTHSVC_LISTEN": f"0.0.0.0:{port}"}, tmp_path, wait=False, port=port) as server:
        wait_serving(f"127.0.0.1:{port}", proc=server.proc)
        with pytest.raises(grpc.RpcError) as info:
            _create(f"127.0.0.1:{port}")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _create(f"127.0.0.1:{port}", (("authorization", "Bearer tok-all-interfaces-0123"),)).secret
        assert server.terminate() == 0
    assert "management is open" not in server.log()


def test_insecure_management_override_serves_and_warns_at_every_start(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_ADMIN_TOKENS": "",
        "AUTHSVC_INSECURE_MANAGEMENT": "true",
        "AUTHSVC_LISTEN": f"0.0.0.0:{port}",
    }
    for _ in range(2):
        with serve_process(env, tmp_path, wait=False, port=port) as server:
            wait_serving(f"127.0.0.1:{port}", proc=server.proc)
            assert _create(f"127.0.0.1:{port}").secret  # open, as explicitly asked for
            assert server.terminate() == 0
        warnings = [line for line in server.log().splitlines() if "management is open on" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and "AUTHSVC_ADMIN_TOKENS" in warnings[0]


def test_loopback_needs_no_tokens(tmp_path: Path, database_url: str) -> None:
    """The default (127.0.0.1) stays as easy as the README's two commands."""
    with serve_process({"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_ADMIN_TOKENS": ""}, tmp_path) as server:
        assert _create(server.target).secret
    assert "management is open" not in server.log()
