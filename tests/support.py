"""Test helpers shared by every test folder: real servers, real databases, real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port as free_port
from bench.procs import free_port_range as free_port_range

if TYPE_CHECKING:
    # The asyncio stub type exists only in the generated .pyi.
    from typing import TypeAlias

    from authsvc_client.v1.authsvc_pb2_grpc import KeyServiceAsyncStub

    Stub: TypeAlias = KeyServiceAsyncStub
else:
    Stub = authsvc_pb2_grpc.KeyServiceStub

ROOT = Path(__file__).resolve().parent.parent
ADMIN = pb.Actor(user_id="alice", role=pb.ROLE_ADMIN)
OWNER = pb.Actor(user_id="olivia", role=pb.ROLE_OWNER)
MEMBER = pb.Actor(user_id="mike", role=pb.ROLE_MEMBER)


def new_org() -> str:
    """Each test works in its own organization: isolation by construction."""
    return f"org-{uuid.uuid4().hex[:12]}"


def bin_path(name: str) -> str:
    """A console script installed next to this interpreter (envoy, grpcurl, authsvc)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def wait_serving(
    target: str,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until ``target`` reports SERVING; ``credentials`` for a TLS server."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before serving")
        try:
            channel = (
                grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
            )
            with channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{target} not serving after {timeout}s: {last}")


@dataclass
class ServerProcess:
    """``authsvc serve`` in a subprocess, as an operator runs it."""

    proc: subprocess.Popen[bytes]
    target: str
    log_path: Path
    http_target: str = ""
    """The ext_authz HTTP listener's host:port ("" when off)."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def serve_process(
    env: Mapping[str, str],
    tmp: Path,
    *,
    args: tuple[str, ...] = (),
    wait: bool = True,
    port: int | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServerProcess]:
    port = port or free_port()
    log_path = tmp / f"authsvc-{port}.log"
    # One process unless a test asks for workers: quicker to start, same code.
    # No drain period unless a test asks for one: nothing health-checks these servers.
    # Its own ext_authz HTTP port too, so that servers of concurrent tests never share the default;
    # no metrics endpoint unless asked for: the default port would be shared by every test's server.
    http_listen = f"127.0.0.1:{free_port()}"
    full_env = {
        **os.environ,
        "AUTHSVC_LISTEN": f"127.0.0.1:{port}",
        "AUTHSVC_HTTP_AUTHZ_LISTEN": http_listen,
        "AUTHSVC_WORKERS": "1",
        "AUTHSVC_DRAIN_SECONDS": "0",
        "AUTHSVC_METRICS_LISTEN": "",
        **env,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authsvc", "serve", *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    server = ServerProcess(proc, f"127.0.0.1:{port}", log_path, full_env["AUTHSVC_HTTP_AUTHZ_LISTEN"])
    try:
        if wait:
            wait_serving(server.target, proc=proc, credentials=credentials)
        yield server
    finally:
        server.terminate()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), reading whatever it sends; None if still open."""
    start = time.monotonic()
    deadline = start + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


class TcpProxy:
    """A real TCP hop to PostgreSQL that a test can cut and restore.

    ``cut()`` drops every open connection and refuses new ones (the server
    looks down, as when a database host dies); ``restore()`` listens again
    on the same port. ``freeze()`` keeps every connection open but passes no
    byte either way, and new connections are accepted but never reach the
    server (a hung database: SIGSTOPped, or a partition without resets);
    ``thaw()`` lets the held bytes through. Tests of fail-closed behaviour
    point authsvc here.
    """

    def __init__(self, target: tuple[str, int] | str) -> None:
        """``target``: (host, port), or the path of PostgreSQL's Unix socket."""
        import threading

        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threading = threading
        self._flowing = threading.Event()
        self._flowing.set()
        self.restore()

    @classmethod
    def for_database(cls, database_url: str) -> TcpProxy:
        """A proxy in front of the server of ``database_url``: TCP, or a Unix socket (the embedded server's)."""
        from urllib.parse import parse_qsl, urlsplit

        parts = urlsplit(database_url)
        socket_dir = dict(parse_qsl(parts.query)).get("host", "")
        if socket_dir.startswith("/") or not parts.hostname:
            return cls(f"{socket_dir or '/var/run/postgresql'}/.s.PGSQL.{parts.port or 5432}")
        return cls((parts.hostname, parts.port or 5432))

    def url_for(self, database_url: str) -> str:
        """``database_url``, but through this proxy over TCP."""
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.thaw()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._flowing.wait()
            try:
                if isinstance(self.target, str):
                    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    upstream.settimeout(5)
                    upstream.connect(self.target)
                else:
                    upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
