"""TLS and mTLS on every listener, and who may manage keys: ``authsvc serve`` processes, the real grpcurl.

Two servers for the module, both real ``authsvc serve`` processes with
certificates made for this run (``tests.tls``), each with all its
listeners: gRPC, Envoy's HTTP check (``AUTHSVC_HTTP_AUTHZ_LISTEN``) and
metrics (``AUTHSVC_METRICS_LISTEN``):

* ``tls``: TLS only, with a per-worker port too (``AUTHSVC_WORKER_BASE_PORT``),
  management behind a named admin token;
* ``mtls``: client certificates required (``AUTHSVC_TLS_CLIENT_CA_FILE``), two
  named tokens (one bound to an organization) and two admin client
  certificate names (one bound to an organization).

What a user checks: grpcurl with ``-cacert`` (and ``-cert/-key``) gets in,
plaintext and foreign certificates do not; the HTTP listeners answer an
HTTPS client (Python's ``http.client``) as they answer plaintext ones
elsewhere, and refuse plaintext and foreign certificates; who the audit
trail names as the caller, read from the database; rotation of the
server's files without a restart, seen by the serial number of the
certificate each listener serves.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client import AsyncClient, Client, TlsConfig, Unavailable
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, ServerProcess, bin_path, closed_within, free_port, new_org, serve_process
from tests.tls import CertificateAuthority, Issued, served_serial

pytestmark = pytest.mark.slow

DEPLOYER = "deployer-token-0123456789abcdef"
BOUND = "acme-bot-token-0123456789abcdef"
ACME = new_org()  # the organization the bound token and bound certificate manage
OTHER = new_org()


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    admin: Issued  # SAN DNS ops.admin.test: an admin client name
    bound_admin: Issued  # SAN URI spiffe://test/acme-admin: an admin client name bound to ACME
    service: Issued  # CN service-a: a valid client certificate, not an admin
    foreign: Issued  # issued by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other = CertificateAuthority(directory, "another CA")
    return Pki(
        ca,
        ca.server(),
        ca.issue("admin", common_name="not-this-cn", dns=("ops.admin.test",), client=True),
        ca.issue("bound-admin", common_name="bound", uris=("spiffe://test/acme-admin",), client=True),
        ca.issue("service", common_name="service-a", client=True),
        other.issue("foreign", common_name="ops.admin.test", dns=("ops.admin.test",), client=True),
    )


def _server_files(pki: Pki, directory: Path, issued: Issued | None = None) -> tuple[Path, Path]:
    """The server's files in a directory of their own, so a test can rotate them in place."""
    issued = issued or pki.server
    directory.mkdir(exist_ok=True)
    cert, key = directory / "server.pem", directory / "server-key.pem"
    cert.write_bytes(issued.cert_pem + pki.ca.cert_pem)  # the chain, CA included: what healthcheck trusts
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return cert, key


def _channel_credentials(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(pki.ca.cert_pem)
    return grpc.ssl_channel_credentials(pki.ca.cert_pem, client.key_pem, client.cert_pem)


@dataclass(frozen=True)
class Served:
    server: ServerProcess
    cert_file: Path
    key_file: Path
    worker_port: int
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.server.target.rpartition(":")[2])

    @property
    def http_port(self) -> int:
        """Envoy's HTTP check."""
        return int(self.server.http_target.rpartition(":")[2])

    @property
    def metrics_port(self) -> int:
        return int(self.env["AUTHSVC_METRICS_LISTEN"].rpartition(":")[2])


@pytest.fixture(scope="module")
def tls(pki: Pki, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = _server_files(pki, tmp / "tls")
    worker_port = free_port()
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_TLS_CERT_FILE": str(cert),
        "AUTHSVC_TLS_KEY_FILE": str(key),
        "AUTHSVC_ADMIN_TOKENS": f"deployer:{DEPLOYER}",
        "AUTHSVC_WORKER_BASE_PORT": str(worker_port),
        "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    with serve_process(env, tmp, credentials=_channel_credentials(pki)) as server:
        yield Served(server, cert, key, worker_port, env)


@pytest.fixture(scope="module")
def mtls(pki: Pki, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("mtls")
    # Valid for client authentication too: authsvc healthcheck presents it under mTLS by default.
    cert, key = _server_files(pki, tmp / "tls", pki.ca.server("mtls-server", client_too=True))
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_TLS_CERT_FILE": str(cert),
        "AUTHSVC_TLS_KEY_FILE": str(key),
        "AUTHSVC_TLS_CLIENT_CA_FILE": str(pki.ca.cert_file),
        "AUTHSVC_ADMIN_TOKENS": f"deployer:{DEPLOYER},acme-bot:{BOUND}:{ACME}",
        "AUTHSVC_ADMIN_CLIENT_NAMES": f"ops.admin.test,spiffe://test/acme-admin={ACME}",
        "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    with serve_process(env, tmp, credentials=_channel_credentials(pki, pki.service)) as server:
        yield Served(server, cert, key, 0, env)


def grpcurl(*args: str, data: dict[str, object] | None = None) -> subprocess.CompletedProcess[str]:
    command = [bin_path("grpcurl"), "-max-time", "10", *args]
    if data is not None:
        command[3:3] = ["-d", json.dumps(data)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def create_request(org: str) -> dict[str, object]:
    return {"org_id": org, "actor": {"user_id": "alice", "role": "ROLE_ADMIN"}, "name": "tls", "scopes": ["read"]}


@contextlib.contextmanager
def key_service(served: Served, credentials: grpc.ChannelCredentials) -> Iterator[authsvc_pb2_grpc.KeyServiceStub]:
    with grpc.secure_channel(served.server.target, credentials) as channel:
        yield authsvc_pb2_grpc.KeyServiceStub(channel)


async def audit_callers(db: asyncpg.Connection, org: str) -> list[tuple[str, str, str | None]]:
    rows = await db.fetch("SELECT action, outcome, caller FROM audit_events WHERE org_id = $1 ORDER BY id", org)
    return [(r["action"], r["outcome"], r["caller"]) for r in rows]


def bearer(token: str) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {token}"),)


def https_context(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    """What an HTTPS client of authsvc's HTTP listeners uses: our CA, and a client certificate under mTLS."""
    context = ssl.create_default_context(cafile=pki.ca.cert_file)
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    return context


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(
    port: int,
    path: str,
    context: ssl.SSLContext | None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> HttpAnswer:
    """One request on a fresh connection: HTTPS with ``context``, plaintext without.

    A refused connection raises (``OSError``: a failed handshake, a reset, or
    ``http.client.RemoteDisconnected`` when the server closed without an answer).
    """
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    )
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return HttpAnswer(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def refused(port: int, path: str, context: ssl.SSLContext | None) -> bool:
    """The listener gives this client no HTTP answer at all."""
    try:
        http_get(port, path, context)
    except (OSError, http.client.HTTPException):
        return True
    return False


def error_code(answer: HttpAnswer) -> str:
    code = json.loads(answer.body)["error"]["code"]
    assert isinstance(code, str)
    return code


# Who would log a refused handshake: the two HTTP listeners, and asyncio under the ext_authz one.
QUIET_LOGGERS = ("authsvc.http_server", "authsvc.metrics", "asyncio")


def quiet_about_handshakes(served: Served) -> None:
    """Refused handshakes are not an error log flood: nothing at the default level, never a traceback."""
    log = served.server.log()
    assert "Traceback" not in log
    noisy = [line for line in log.splitlines() if any(f" {name}: " in line for name in QUIET_LOGGERS)]
    assert noisy == [], noisy


# -- TLS ----------------------------------------------------------------------


def test_grpcurl_with_the_ca_reaches_every_listener_and_plaintext_does_not(pki: Pki, tls: Served) -> None:
    """The shared port and the per-worker port both speak TLS only."""
    for port in (tls.port, tls.worker_port):
        listed = grpcurl("-cacert", str(pki.ca.cert_file), f"127.0.0.1:{port}", "list")
        assert listed.returncode == 0, listed.stderr
        assert "authsvc.v1.KeyService" in listed.stdout
        plain = grpcurl("-plaintext", f"127.0.0.1:{port}", "list")
        assert plain.returncode != 0 and "authsvc.v1.KeyService" not in plain.stdout
        untrusted = grpcurl(f"127.0.0.1:{port}", "list")  # the system's roots do not know our CA
        assert untrusted.returncode != 0 and "certificate" in untrusted.stderr


async def test_a_named_token_manages_over_tls_and_is_the_audit_caller(
    pki: Pki, tls: Served, db: asyncpg.Connection
) -> None:
    org = new_org()
    common = ("-cacert", str(pki.ca.cert_file))
    anonymous = grpcurl(*common, f"127.0.0.1:{tls.port}", "authsvc.v1.KeyService/CreateKey", data=create_request(org))
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
    created = grpcurl(
        *common,
        "-H",
        f"authorization: Bearer {DEPLOYER}",
        f"127.0.0.1:{tls.port}",
        "authsvc.v1.KeyService/CreateKey",
        data=create_request(org),
    )
    assert created.returncode == 0, created.stderr
    assert await audit_callers(db, org) == [("key.create", "ok", "deployer")]
    assert DEPLOYER not in tls.server.log()


def test_the_python_client_over_tls(pki: Pki, tls: Served) -> None:
    with key_service(tls, _channel_credentials(pki)) as keys:
        secret = keys.CreateKey(pb.CreateKeyRequest(**create_request(new_org())), metadata=bearer(DEPLOYER)).secret  # type: ignore[arg-type]
    with Client(tls.server.target, tls=TlsConfig(root_certificates=pki.ca.cert_pem), timeout=5) as client:
        assert client.authorize(secret, "read").allowed
    with Client(tls.server.target, timeout=1) as plaintext, pytest.raises(Unavailable):
        plaintext.authorize(secret, "read")


def test_healthcheck_speaks_tls_with_the_servers_own_settings(tls: Served) -> None:
    """The Dockerfile's HEALTHCHECK runs ``authsvc healthcheck`` in the server's environment."""
    env = {**os.environ, **tls.env, "AUTHSVC_LISTEN": tls.server.target}
    result = subprocess.run(
        [sys.executable, "-m", "authsvc", "healthcheck"], env=env, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr


def test_envoys_http_check_over_tls_answers_200_401_403_and_healthz_204_and_plaintext_gets_nothing(
    pki: Pki, tls: Served
) -> None:
    """``AUTHSVC_HTTP_AUTHZ_LISTEN`` under TLS: the answers Envoy gets in plaintext elsewhere, over HTTPS only."""
    org = new_org()
    with key_service(tls, _channel_credentials(pki)) as keys:
        request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="http", scopes=["read"])
        secret = keys.CreateKey(request, timeout=5, metadata=bearer(DEPLOYER)).secret
    context = https_context(pki)
    allowed = http_get(tls.http_port, "/check/items", context, {"x-api-key": secret})
    assert (allowed.status, allowed.headers["x-authsvc-org-id"]) == (200, org)
    missing = http_get(tls.http_port, "/check/items", context)
    assert (missing.status, error_code(missing)) == (401, "missing_key")
    scope = http_get(tls.http_port, "/check/items", context, {"x-api-key": secret}, method="POST")
    assert (scope.status, error_code(scope)) == (403, "insufficient_scope")
    assert http_get(tls.http_port, "/healthz", context).status == 204
    # Negotiated as HTTP/1.1, over TLS 1.2 or newer.
    with socket_to(tls.http_port) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
    offered = https_context(pki)
    offered.set_alpn_protocols(["h2", "http/1.1"])
    with socket_to(tls.http_port) as raw, offered.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.selected_alpn_protocol() == "http/1.1"
    assert refused(tls.http_port, "/healthz", None)  # plaintext: no answer, not even a 400
    quiet_about_handshakes(tls)


def read_status(conn: http.client.HTTPConnection) -> int:
    reply = conn.getresponse()
    reply.read()  # the connection is reused: its answer must be read to the end
    return reply.status


def socket_to(port: int) -> contextlib.closing[socket.socket]:
    return contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=5))


def test_metrics_are_scraped_over_tls_only(pki: Pki, tls: Served) -> None:
    scraped = http_get(tls.metrics_port, "/metrics", https_context(pki))
    assert scraped.status == 200
    assert b"authsvc_build_info" in scraped.body
    assert refused(tls.metrics_port, "/metrics", None)
    quiet_about_handshakes(tls)


def test_clients_that_never_finish_the_tls_handshake_are_closed_in_time_and_hold_up_no_one(
    pki: Pki, database_url: str, tmp_path: Path
) -> None:
    """Raw TCP that sends nothing, or half a ClientHello, to either HTTP listener: closed after the 1 s bound.

    Meanwhile an HTTPS client is answered at once: the handshakes wait on
    their own (a task, a thread), never in the accept loop.
    """
    cert, key = _server_files(pki, tmp_path / "tls")
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_TLS_CERT_FILE": str(cert),
        "AUTHSVC_TLS_KEY_FILE": str(key),
        "AUTHSVC_HANDSHAKE_TIMEOUT_MS": "1000",
        "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    with serve_process(env, tmp_path, credentials=_channel_credentials(pki)) as server:
        served = Served(server, cert, key, 0, env)
        ports = (served.http_port, served.metrics_port)
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for port in ports for _ in range(5)]
        for sock in stalled[::2]:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, and then nothing
        try:
            started = time.monotonic()
            assert http_get(served.http_port, "/healthz", https_context(pki)).status == 204
            assert http_get(served.metrics_port, "/metrics", https_context(pki)).status == 200
            answered = time.monotonic() - started
            closed = [closed_within(sock, 4.0) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
        quiet_about_handshakes(served)
    assert answered < 0.9, answered  # neither waited for a stalled handshake
    assert all(c is not None for c in closed), closed
    assert max(c for c in closed if c is not None) < 3.0, closed


def test_rotated_certificate_files_are_served_without_a_restart(pki: Pki, tls: Served) -> None:
    """Every listener: both gRPC ports, Envoy's HTTP check and metrics; open connections keep theirs."""
    before = served_serial("127.0.0.1", tls.port)
    assert before == pki.server.serial
    for port in (tls.http_port, tls.metrics_port):
        assert served_serial("127.0.0.1", port, "http/1.1") == pki.server.serial
    kept_open = http.client.HTTPSConnection("127.0.0.1", tls.http_port, timeout=5, context=https_context(pki))
    kept_open.request("GET", "/healthz")
    assert read_status(kept_open) == 204
    fresh = pki.ca.server("rotated")
    # As a secret manager does: write new files beside the old, then rename over them.
    for data, target in ((fresh.cert_pem + pki.ca.cert_pem, tls.cert_file), (fresh.key_pem, tls.key_file)):
        staged = target.with_suffix(".new")
        staged.write_bytes(data)
        staged.chmod(0o600)
        staged.replace(target)
    deadline = time.monotonic() + 10
    while served_serial("127.0.0.1", tls.port) != fresh.serial:
        assert time.monotonic() < deadline, "the new certificate was not served within 10 s"
        time.sleep(0.1)
    assert served_serial("127.0.0.1", tls.worker_port) == fresh.serial  # every listener
    for port in (tls.http_port, tls.metrics_port):  # looked at once a second at most
        while served_serial("127.0.0.1", port, "http/1.1") != fresh.serial:
            assert time.monotonic() < deadline, f"port {port} did not serve the new certificate within 10 s"
            time.sleep(0.1)
    assert tls.server.proc.poll() is None  # the same process
    listed = grpcurl("-cacert", str(pki.ca.cert_file), tls.server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert http_get(tls.http_port, "/healthz", https_context(pki)).status == 204  # verified against the CA
    # The connection opened before the rotation still serves (it keeps the session it shook hands on).
    kept_open.request("GET", "/healthz")
    assert read_status(kept_open) == 204
    kept_open.close()
    # A broken rotation (a key that is not the certificate's) keeps the last good files, on every listener.
    tls.key_file.write_bytes(pki.service.key_pem)
    assert served_serial("127.0.0.1", tls.port) == fresh.serial
    time.sleep(1.1)  # past the HTTP listeners' once-a-second look
    for port in (tls.http_port, tls.metrics_port):
        assert served_serial("127.0.0.1", port, "http/1.1") == fresh.serial
    log = tls.server.log()
    for listener in ("gRPC listeners", "HTTP ext_authz listener", "metrics listener"):
        assert f"cannot be used on the {listener}" in log, log
    assert "PRIVATE KEY" not in log
    tls.key_file.write_bytes(fresh.key_pem)


# -- mTLS ---------------------------------------------------------------------


def test_mtls_needs_a_client_certificate_from_the_configured_ca(pki: Pki, mtls: Served) -> None:
    ca = ("-cacert", str(pki.ca.cert_file))
    with_cert = grpcurl(
        *ca, "-cert", str(pki.service.cert_file), "-key", str(pki.service.key_file), mtls.server.target, "list"
    )
    assert with_cert.returncode == 0, with_cert.stderr
    assert grpcurl(*ca, mtls.server.target, "list").returncode != 0
    foreign = grpcurl(
        *ca, "-cert", str(pki.foreign.cert_file), "-key", str(pki.foreign.key_file), mtls.server.target, "list"
    )
    assert foreign.returncode != 0 and "authsvc.v1.KeyService" not in foreign.stdout
    assert grpcurl("-plaintext", mtls.server.target, "list").returncode != 0


async def test_an_admin_client_certificate_manages_without_a_token_and_is_the_audit_caller(
    pki: Pki, mtls: Served, db: asyncpg.Connection
) -> None:
    org = new_org()
    cert = ("-cacert", str(pki.ca.cert_file), "-cert", str(pki.admin.cert_file), "-key", str(pki.admin.key_file))
    created = grpcurl(*cert, mtls.server.target, "authsvc.v1.KeyService/CreateKey", data=create_request(org))
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["key"]["id"]
    revoke = {"org_id": org, "key_id": key_id, "actor": {"user_id": "alice", "role": "ROLE_ADMIN"}, "reason": "x"}
    assert grpcurl(*cert, mtls.server.target, "authsvc.v1.KeyService/RevokeKey", data=revoke).returncode == 0
    # Named by its SAN DNS name; its CN ("not-this-cn") is ignored when it has SANs.
    assert await audit_callers(db, org) == [
        ("key.create", "ok", "ops.admin.test"),
        ("key.revoke", "ok", "ops.admin.test"),
    ]


async def test_a_certificate_that_is_not_an_admin_may_authorize_but_not_manage(
    pki: Pki, mtls: Served, db: asyncpg.Connection
) -> None:
    org = new_org()
    with key_service(mtls, _channel_credentials(pki, pki.service)) as keys:
        request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="svc", scopes=["read"])
        with pytest.raises(grpc.RpcError) as refused:
            keys.CreateKey(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:  # an offered token is decisive
            keys.CreateKey(request, timeout=5, metadata=bearer("x" * 32))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        created = keys.CreateKey(request, timeout=5, metadata=bearer(DEPLOYER))  # token over a plain client cert
        reply = keys.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read"), timeout=5)
        assert reply.allowed  # Authorize needs possession of the key only
    assert await audit_callers(db, org) == [("key.create", "ok", "deployer")]


async def test_org_bound_token_and_certificate_are_denied_in_other_orgs_and_audited(
    pki: Pki, mtls: Served, db: asyncpg.Connection
) -> None:
    with key_service(mtls, _channel_credentials(pki, pki.service)) as keys:
        own = keys.CreateKey(
            pb.CreateKeyRequest(org_id=ACME, actor=ADMIN, name="bot", scopes=["read"]),
            timeout=5,
            metadata=bearer(BOUND),
        )
        assert own.secret
        with pytest.raises(grpc.RpcError) as denied:
            keys.CreateKey(
                pb.CreateKeyRequest(org_id=OTHER, actor=ADMIN, name="bot", scopes=["read"]),
                timeout=5,
                metadata=bearer(BOUND),
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "acme-bot" in (denied.value.details() or "")
        with pytest.raises(grpc.RpcError) as denied:
            keys.ListKeys(pb.ListKeysRequest(org_id=OTHER, actor=ADMIN), timeout=5, metadata=bearer(BOUND))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with key_service(mtls, _channel_credentials(pki, pki.bound_admin)) as keys:
        keys.ListKeys(pb.ListKeysRequest(org_id=ACME, actor=ADMIN), timeout=5)
        with pytest.raises(grpc.RpcError) as denied:
            keys.ListKeys(pb.ListKeysRequest(org_id=OTHER, actor=ADMIN), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await audit_callers(db, OTHER) == [
        ("key.create", "denied", "acme-bot"),
        ("key.list", "denied", "acme-bot"),
        ("key.list", "denied", "spiffe://test/acme-admin"),
    ]
    assert (await audit_callers(db, ACME))[:2] == [
        ("key.create", "ok", "acme-bot"),
        ("key.list", "ok", "spiffe://test/acme-admin"),
    ]
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", OTHER) == 0


def test_envoys_http_check_and_metrics_over_mtls_need_a_client_certificate_from_the_ca(pki: Pki, mtls: Served) -> None:
    """Under mTLS the HTTP listeners, like gRPC, answer only clients with a certificate from the client CA."""
    with key_service(mtls, _channel_credentials(pki, pki.admin)) as keys:
        request = pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="http", scopes=["read"])
        secret = keys.CreateKey(request, timeout=5).secret
    service = https_context(pki, pki.service)
    assert http_get(mtls.http_port, "/check/items", service, {"x-api-key": secret}).status == 200
    assert http_get(mtls.http_port, "/check/items", service).status == 401
    assert http_get(mtls.http_port, "/healthz", service).status == 204
    assert http_get(mtls.metrics_port, "/metrics", service).status == 200
    for port, path in ((mtls.http_port, "/healthz"), (mtls.metrics_port, "/metrics")):
        assert refused(port, path, https_context(pki)), "no client certificate"
        assert refused(port, path, https_context(pki, pki.foreign)), "a certificate from another CA"
        assert refused(port, path, None), "plaintext"
    quiet_about_handshakes(mtls)


async def test_the_python_clients_over_mtls(pki: Pki, mtls: Served) -> None:
    with key_service(mtls, _channel_credentials(pki, pki.admin)) as keys:
        secret = keys.CreateKey(pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="c", scopes=["read"])).secret
    files = TlsConfig.from_files(pki.ca.cert_file, pki.service.cert_file, pki.service.key_file)
    with Client(mtls.server.target, tls=files, timeout=5) as client:
        assert client.authorize(secret, "read").allowed
    async with AsyncClient(mtls.server.target, tls=files, timeout=5) as aclient:
        assert (await aclient.authorize(secret, "read")).allowed
    without_cert = TlsConfig(root_certificates=pki.ca.cert_pem)
    async with AsyncClient(mtls.server.target, tls=without_cert, timeout=2) as refused:
        with pytest.raises(Unavailable):
            await refused.authorize(secret, "read")


def test_healthcheck_presents_a_client_certificate_under_mtls(pki: Pki, mtls: Served) -> None:
    def healthcheck(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authsvc", "healthcheck", "--target", mtls.server.target, *flags],
            env={k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")},
            capture_output=True,
            text=True,
            timeout=30,
        )

    in_server_env = subprocess.run(
        [sys.executable, "-m", "authsvc", "healthcheck"],
        env={**os.environ, **mtls.env, "AUTHSVC_LISTEN": mtls.server.target},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (in_server_env.returncode, in_server_env.stdout.strip()) == (0, "SERVING"), in_server_env.stderr
    ok = healthcheck(
        "--ca-file",
        str(pki.ca.cert_file),
        "--cert-file",
        str(pki.service.cert_file),
        "--key-file",
        str(pki.service.key_file),
    )
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    assert healthcheck("--ca-file", str(pki.ca.cert_file)).returncode == 1


# -- start-up ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "variable"),
    [
        ({"AUTHSVC_TLS_CERT_FILE": "server"}, "AUTHSVC_TLS_KEY_FILE"),
        ({"AUTHSVC_TLS_CERT_FILE": "garbage", "AUTHSVC_TLS_KEY_FILE": "server-key"}, "AUTHSVC_TLS_CERT_FILE"),
        ({"AUTHSVC_TLS_CERT_FILE": "server", "AUTHSVC_TLS_KEY_FILE": "service-key"}, "AUTHSVC_TLS_KEY_FILE"),
        ({"AUTHSVC_TLS_CERT_FILE": "server", "AUTHSVC_TLS_KEY_FILE": "missing"}, "AUTHSVC_TLS_KEY_FILE"),
        (
            {
                "AUTHSVC_TLS_CERT_FILE": "server",
                "AUTHSVC_TLS_KEY_FILE": "server-key",
                "AUTHSVC_TLS_CLIENT_CA_FILE": "garbage",
            },
            "AUTHSVC_TLS_CLIENT_CA_FILE",
        ),
    ],
    ids=["cert without key", "cert not PEM", "key of another cert", "key missing", "client CA not PEM"],
)
def test_bad_tls_files_stop_the_start_in_one_line(
    pki: Pki, files: dict[str, str], variable: str, tmp_path: Path
) -> None:
    shutil.copy(pki.server.cert_file, tmp_path / "server")
    shutil.copy(pki.server.key_file, tmp_path / "server-key")
    shutil.copy(pki.service.key_file, tmp_path / "service-key")
    (tmp_path / "garbage").write_text("not a certificate\n")
    env = {k: str(tmp_path / v) for k, v in files.items()}
    result = subprocess.run(
        [sys.executable, "-m", "authsvc", "serve"],
        env={**os.environ, "AUTHSVC_LISTEN": f"127.0.0.1:{free_port()}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert "PRIVATE KEY" not in result.stderr and "Traceback" not in result.stderr
