"""``authsvc serve`` as an operator runs it: start-up errors, embedded PostgreSQL, SIGTERM, logs, workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, free_port, new_org, serve_process, wait_serving


def run_serve(env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authsvc", "serve"],
        env={
            **os.environ,
            "AUTHSVC_LISTEN": f"127.0.0.1:{free_port()}",
            "AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{free_port()}",
            "AUTHSVC_METRICS_LISTEN": "",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AUTHSVC_KEY_PREFIX": "Not Valid"}, "AUTHSVC_KEY_PREFIX"),
        ({"AUTHSVC_SCOPES_FILE": "/nope.toml"}, "AUTHSVC_SCOPES_FILE"),
        ({"AUTHSVC_SCOPES_FILE": "{tmp}/latin1.toml"}, "AUTHSVC_SCOPES_FILE"),
        ({"AUTHSVC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none?sslmode=bogus"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_LISTEN": "127.0.0.1:{port}", "AUTHSVC_WORKER_BASE_PORT": "{port}"}, "AUTHSVC_WORKER_BASE_PORT"),
        (
            {"AUTHSVC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1,127.0.0.1:2/db?target_session_attrs=any"},
            "AUTHSVC_DATABASE_URL",
        ),
    ],
    ids=[
        "bad prefix",
        "missing scopes file",
        "scopes file not UTF-8",
        "unreachable database",
        "bad DSN parameter",
        "worker ports overlap the listen port",
        "a session attribute that admits a standby",
    ],
)
def test_startup_errors_are_one_line_naming_what_to_change(env: dict[str, str], expected: str, tmp_path: Path) -> None:
    (tmp_path / "latin1.toml").write_bytes('[scopes.lecture]\ndescription = "lire\xe9"\n'.encode("latin-1"))
    port = str(free_port())
    result = run_serve({k: v.replace("{tmp}", str(tmp_path)).replace("{port}", port) for k, v in env.items()}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("authsvc: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path, database_url: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_serve({"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_LISTEN": f"127.0.0.1:{port}"}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # not even gRPC core's own complaint first
    assert "cannot listen on" in lines[0] and "AUTHSVC_LISTEN" in lines[0]


def test_ext_authz_http_port_in_use_is_one_line_naming_its_setting(tmp_path: Path, database_url: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_serve(
            {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{port}"}, tmp_path
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "AUTHSVC_HTTP_AUTHZ_LISTEN" in lines[0] and "empty turns it off" in lines[0]


def test_an_empty_http_authz_listen_serves_grpc_only(tmp_path: Path, database_url: str) -> None:
    with serve_process({"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_HTTP_AUTHZ_LISTEN": ""}, tmp_path) as server:
        _lifecycle(server.target)
        assert "http_authz_listen" not in server.log().split("authsvc serving", 1)[1].splitlines()[0]
        assert server.terminate() == 0


def _lifecycle(target: str) -> tuple[str, str]:
    """Create, authorize and revoke a key; returns (secret, prefix)."""
    with grpc.insecure_channel(target) as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        org = new_org()
        created = stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]))
        assert stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read")).allowed
        stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
        assert not stub.Authorize(pb.AuthorizeRequest(key=created.secret)).allowed
        stub.Authorize(pb.AuthorizeRequest(key=created.secret[:-1] + "x"))
        return created.secret, created.key.prefix


def test_logs_never_contain_a_secret_and_sigterm_drains(tmp_path: Path, database_url: str) -> None:
    with serve_process({"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_LOG_LEVEL": "DEBUG"}, tmp_path) as server:
        secret, prefix = _lifecycle(server.target)
        assert server.terminate() == 0
    log = server.log()
    assert secret not in log and secret[12:] not in log
    assert prefix in log  # the display prefix is how operators find a key in logs
    assert "shutting down" in log


def test_embedded_postgresql_needs_no_configuration(tmp_path: Path) -> None:
    """With no database URL the service starts its own PostgreSQL in AUTHSVC_DATA_DIR."""
    data = tmp_path / "data"
    env = {"AUTHSVC_DATABASE_URL": "", "AUTHSVC_DATA_DIR": str(data)}
    with serve_process(env, tmp_path) as server:
        _lifecycle(server.target)
        assert server.terminate() == 0
    assert (data / "pgdata" / "PG_VERSION").exists()


def test_workers_share_the_port_and_each_has_its_own(tmp_path: Path, database_url: str) -> None:
    base = free_port()
    while any(_busy(base + i) for i in range(2)):
        base = free_port()
    shared = free_port()
    while shared in (base, base + 1):
        shared = free_port()
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_WORKER_BASE_PORT": str(base)}
    with serve_process(env, tmp_path, args=("--workers", "2"), port=shared) as server:
        for port in (base, base + 1):  # the shared port answers as soon as one worker is up
            wait_serving(f"127.0.0.1:{port}", proc=server.proc)
        with (
            grpc.insecure_channel(f"127.0.0.1:{base}") as first,
            grpc.insecure_channel(f"127.0.0.1:{base + 1}") as second,
        ):
            a, b = authsvc_pb2_grpc.KeyServiceStub(first), authsvc_pb2_grpc.KeyServiceStub(second)
            org = new_org()
            created = a.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]))
            assert b.Authorize(pb.AuthorizeRequest(key=created.secret)).allowed  # cached in worker 1
            a.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
            deadline = time.monotonic() + 2
            while b.Authorize(pb.AuthorizeRequest(key=created.secret)).allowed:
                assert time.monotonic() < deadline, "worker 1 still allows a key revoked through worker 0"
        children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        assert server.terminate() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), signal.SIG_DFL)  # every worker is gone


def test_workers_share_the_http_authz_port_and_connections_spread_over_them(tmp_path: Path, database_url: str) -> None:
    """SO_REUSEPORT: the kernel hashes each new connection to one worker; Envoy's HTTP/1.1 pool opens many.

    32 connections all landing on one of 2 workers would happen once in 2**31 runs.
    """
    http_port = free_port()
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{http_port}"}
    with serve_process(env, tmp_path, args=("--workers", "2")) as server:
        deadline = time.monotonic() + 20
        while len(_socket_pids("-tlnpH", http_port)) < 2:  # both workers listening
            assert time.monotonic() < deadline, "the workers did not both listen on the HTTP port"
            time.sleep(0.1)
        conns = [socket.create_connection(("127.0.0.1", http_port), timeout=5) for _ in range(32)]
        try:
            for conn in conns:  # each connection answered: accepted by a worker, not just queued
                conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
                assert conn.recv(100).startswith(b"HTTP/1.1 204 ")
            split = Counter(_socket_pids("-tnpH", http_port, "established"))
        finally:
            for conn in conns:
                conn.close()
        assert len(split) == 2 and sum(split.values()) == 32, split
        assert min(split.values()) >= 1, split
        assert server.terminate() == 0


def _socket_pids(flags: str, port: int, state: str | None = None) -> list[int]:
    argv = ["ss", flags, *(["state", state] if state else []), f"( sport = :{port} )"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    return [int(line.split("pid=", 1)[1].split(",", 1)[0]) for line in out.splitlines() if "pid=" in line]


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_healthcheck_command_reports_serving_and_failure(tmp_path: Path, database_url: str) -> None:
    """What the Docker HEALTHCHECK runs."""
    with serve_process({"AUTHSVC_DATABASE_URL": database_url}, tmp_path) as server:
        ok = subprocess.run(
            [sys.executable, "-m", "authsvc", "healthcheck", "--target", server.target],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    down = subprocess.run(
        [sys.executable, "-m", "authsvc", "healthcheck", "--target", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1
    assert "not healthy" in down.stderr and "Traceback" not in down.stderr
