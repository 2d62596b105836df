"""``AUTHSVC_METRICS_LISTEN``: the ``/metrics`` endpoint of a real ``authsvc serve`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import free_port, serve_process


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  # a fixed http://127.0.0.1 URL
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_are_served_on_slash_metrics_only(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{port}"}
    with serve_process(env, tmp_path) as server:
        with grpc.insecure_channel(server.target) as channel:
            authsvc_pb2_grpc.KeyServiceStub(channel).Authorize(pb.AuthorizeRequest(key="", required_scope="read"))
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'authsvc_authorize_total{reason="missing_key",transport="grpc"} 1.0' in text
        deadline = time.monotonic() + 10
        while "authsvc_invalidation_feed_up 1.0" not in text:  # the listener subscribes just after start
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
            text = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert get(f"http://127.0.0.1:{port}/")[0] == 404
        assert get(f"http://127.0.0.1:{port}/metrics/../admin")[0] == 404
        assert server.terminate() == 0


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, from ``ss``."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines() if f"pid={pid}," in line}


def test_an_empty_metrics_listen_serves_no_endpoint(tmp_path: Path, database_url: str) -> None:
    metrics_port = free_port()
    # Envoy's HTTP listener off too, so that the gRPC port is the only other one.
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_METRICS_LISTEN": "", "AUTHSVC_HTTP_AUTHZ_LISTEN": ""}
    with serve_process(env, tmp_path) as off:
        assert listening_ports(off.proc.pid) == {int(off.target.rpartition(":")[2])}
    env = {**env, "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
    with serve_process(env, tmp_path) as on:  # the same check sees the endpoint when there is one
        assert listening_ports(on.proc.pid) == {int(on.target.rpartition(":")[2]), metrics_port}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_port_is_a_one_line_start_up_error(tmp_path: Path, database_url: str, workers: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "authsvc", "serve", "--workers", workers],
            env={
                **os.environ,
                "AUTHSVC_DATABASE_URL": database_url,
                "AUTHSVC_LISTEN": f"127.0.0.1:{free_port()}",
                "AUTHSVC_HTTP_AUTHZ_LISTEN": "",
                "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{port}",
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"authsvc: cannot listen on 127.0.0.1:{port}") and "AUTHSVC_METRICS_LISTEN" in lines[0]


def test_a_malformed_metrics_listen_names_the_variable() -> None:
    from authsvc.config import Settings
    from authsvc.core.errors import ConfigError

    with pytest.raises(ConfigError, match="AUTHSVC_METRICS_LISTEN"):
        Settings.from_env({"AUTHSVC_METRICS_LISTEN": "9464"})
    assert Settings.from_env({}).metrics_listen == "127.0.0.1:9464"
    assert Settings.from_env({"AUTHSVC_METRICS_LISTEN": " "}).metrics_listen == ""


def test_a_client_that_never_sends_its_request_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread and descriptor per scrape: a connection that sends nothing is closed after the request timeout."""
    from authsvc import metrics

    monkeypatch.setattr(metrics, "REQUEST_SECONDS", 0.5)
    server = metrics.MetricsServer(f"127.0.0.1:{free_port()}", list)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server, not by our own timeout
            assert time.monotonic() - started < 3
    finally:
        server.stop()
