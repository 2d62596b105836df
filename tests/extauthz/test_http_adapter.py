"""Envoy's ext_authz HTTP protocol, against the real App: real PostgreSQL, real keys, real HTTP on its own port.

Each request here is what Envoy sends for a client request (the client's
method, its path under ``path_prefix``, the allowed headers, the route
headers); each answer is checked for what Envoy then does with it.
``test_envoy_e2e.py`` runs the real Envoy against the same listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.extauthz_http import HttpAuthorizationAdapter
from authsvc.http_server import Request, Response
from authsvc.runtime import App
from tests.extauthz.rawhttp import Answer, Client, ask, request_bytes
from tests.replicas import behind_a_proxy
from tests.support import ADMIN, Stub, TcpProxy, new_org

IDENTITY = ("x-authsvc-org-id", "x-authsvc-key-id", "x-authsvc-user-id", "x-authsvc-scopes")


async def create(stub: Stub, scopes: list[str], rate_limit: int = 0) -> tuple[str, str, str]:
    org = new_org()
    reply = await stub.CreateKey(
        pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="http", scopes=scopes, rate_limit=rate_limit), timeout=5
    )
    return org, reply.secret, reply.key.id


def removed(answer: Answer) -> set[str]:
    return set(answer.headers["x-envoy-auth-headers-to-remove"].split(","))


def error_code(answer: Answer, *secrets: str) -> str:
    assert answer.headers["content-type"] == "application/json"
    text = answer.body.decode()
    for secret in secrets:
        assert secret not in text
        assert all(secret not in value for value in answer.headers.values())
    code = json.loads(text)["error"]["code"]
    assert isinstance(code, str)
    return code


async def test_allowed_carries_identity_and_removes_the_key_forged_and_route_headers(app: App, stub: Stub) -> None:
    org, secret, key_id = await create(stub, ["read"])
    answer = await ask(
        app.http_port,
        "GET",
        "/check/orders?page=1",
        {"x-api-key": secret, "x-authsvc-org-id": "victim", "x-authsvc-role": "owner"},
    )
    assert answer.status == 200
    assert answer.headers["x-authsvc-org-id"] == org
    assert answer.headers["x-authsvc-key-id"] == key_id
    assert answer.headers["x-authsvc-user-id"] == ADMIN.user_id
    assert answer.headers["x-authsvc-scopes"] == "read"
    # The key, forged headers that are not identity headers (identity ones are overwritten), and the route
    # headers, which a client may have sent to the upstream even though Envoy keeps them from authsvc.
    assert removed(answer) == {"x-api-key", "x-authsvc-role", "x-authsvc-required-scope", "x-authsvc-public"}
    assert secret not in answer.body.decode() + "".join(answer.headers.values())


async def test_authorization_apikey_form_and_the_same_key_twice_are_allowed(app: App, stub: Stub) -> None:
    org, secret, _ = await create(stub, ["read"])
    answer = await ask(app.http_port, "GET", "/check/x", {"authorization": f"ApiKey {secret}"})
    assert (answer.status, answer.headers["x-authsvc-org-id"]) == (200, org)
    assert "authorization" in removed(answer)
    both = await ask(app.http_port, "GET", "/check/x", {"authorization": f"ApiKey {secret}", "x-api-key": secret})
    assert both.status == 200
    assert {"authorization", "x-api-key"} <= removed(both)


async def test_two_different_keys_are_malformed(app: App, stub: Stub) -> None:
    _, first, _ = await create(stub, ["read"])
    _, second, _ = await create(stub, ["read"])
    answer = await ask(app.http_port, "GET", "/check/x", {"x-api-key": first, "authorization": f"ApiKey {second}"})
    assert answer.status == 401
    assert error_code(answer, first, second) == "malformed_key"


@pytest.mark.parametrize("case", ["missing", "malformed", "unknown", "revoked"])
async def test_bad_keys_get_401_with_a_challenge_and_a_json_body(app: App, stub: Stub, case: str) -> None:
    headers: dict[str, str] = {}
    if case == "malformed":
        headers["x-api-key"] = "authsvc_not-a-real-key"
    elif case == "unknown":
        headers["x-api-key"] = KeyFormat("authsvc").generate().secret
    elif case == "revoked":
        org, secret, key_id = await create(stub, ["read"])
        await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, reason="t"), timeout=5)
        headers["x-api-key"] = secret
    answer = await ask(app.http_port, "GET", "/check/x", headers)
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == 'ApiKey realm="authsvc", header="x-api-key"'
    expected = {"missing": "missing_key", "malformed": "malformed_key", "unknown": "unknown_key", "revoked": "revoked"}
    assert error_code(answer, *headers.values()) == expected[case]
    # Only an identified key's org and key id go along, for Envoy's access log (dynamic_metadata_from_headers);
    # Envoy passes none of them to the client (allowed_client_headers), which test_envoy_e2e.py checks.
    identified = {"x-authsvc-org-id", "x-authsvc-key-id"} if case == "revoked" else set()
    assert set(IDENTITY) & set(answer.headers) == identified


async def test_method_rules_apply_without_a_route_scope(app: App, stub: Stub) -> None:
    _, secret, _ = await create(stub, ["read"])
    for method in ("GET", "OPTIONS"):
        assert (await ask(app.http_port, method, "/check/x", {"x-api-key": secret})).status == 200
    denied = await ask(app.http_port, "POST", "/check/x", {"x-api-key": secret})
    assert denied.status == 403
    assert error_code(denied, secret) == "insufficient_scope"
    assert "www-authenticate" not in denied.headers


async def test_head_is_answered_with_a_head_only(app: App, stub: Stub) -> None:
    """Envoy forwards the client's method; a body after a HEAD answer would be read as the next answer."""
    client = await Client.connect(app.http_port)
    try:
        await client.send(request_bytes("HEAD", "/check/x") + request_bytes("GET", "/healthz"))
        head = await client.answer(head=True)
        assert head.status == 401
        assert int(head.headers["content-length"]) > 0
        assert (await client.answer()).status == 204  # the next answer is intact
    finally:
        client.close()


async def test_the_route_scope_header_wins_over_the_method_rules(app: App, stub: Stub) -> None:
    _, reader, _ = await create(stub, ["read"])
    _, writer, _ = await create(stub, ["write"])
    route = {"x-authsvc-required-scope": "write"}
    denied = await ask(app.http_port, "GET", "/check/admin/settings", {"x-api-key": reader, **route})
    assert denied.status == 403
    assert error_code(denied, reader) == "insufficient_scope"
    allowed = await ask(app.http_port, "GET", "/check/admin/settings", {"x-api-key": writer, **route})
    assert (allowed.status, allowed.headers["x-authsvc-scopes"]) == (200, "read write")


async def test_a_public_route_needs_no_key_and_still_strips_keys_and_forged_identity(app: App, stub: Stub) -> None:
    public = {"x-authsvc-public": "true"}
    bare = await ask(app.http_port, "GET", "/check/public/docs", public)
    assert bare.status == 200
    assert not set(IDENTITY) & set(bare.headers)
    _, first, _ = await create(stub, ["read"])
    _, second, _ = await create(stub, ["read"])
    answer = await ask(
        app.http_port,
        "GET",
        "/check/public/docs",
        {**public, "x-api-key": first, "authorization": f"ApiKey {second}", "x-authsvc-org-id": "forged"},
    )
    assert answer.status == 200  # conflicting keys do not matter where no key is needed ...
    assert {"x-api-key", "authorization", "x-authsvc-org-id"} <= removed(answer)  # ... but none goes upstream
    assert not set(IDENTITY) & set(answer.headers)
    other = await ask(app.http_port, "GET", "/check/public/docs", {"x-authsvc-public": "yes"})
    assert other.status == 401  # only "true" makes a route public


@pytest.mark.parametrize("scope", ["", "  ", "projects:admin"])
async def test_an_empty_or_unknown_route_scope_is_500_misconfigured_and_logged(
    app: App, stub: Stub, scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5xx, so Envoy answers ``status_on_error`` (503): never an allow, and the log names the problem."""
    _, secret, _ = await create(stub, ["write"])
    with caplog.at_level(logging.ERROR, logger="authsvc.extauthz"):
        answer = await ask(app.http_port, "GET", "/check/x", {"x-api-key": secret, "x-authsvc-required-scope": scope})
    assert answer.status == 500
    assert error_code(answer, secret) == "misconfigured_route"
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert ("projects:admin" in logged) if scope.strip() else ("requires no scope" in logged)


async def test_429_says_when_to_retry_and_allowed_answers_carry_the_budget(app: App, stub: Stub) -> None:
    _, secret, _ = await create(stub, ["read"], rate_limit=2)
    answers = [await ask(app.http_port, "GET", "/check/x", {"x-api-key": secret}) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert answers[0].headers["ratelimit-limit"] == "2"
    assert answers[0].headers["ratelimit-remaining"] == "1"
    limited = answers[2]
    assert error_code(limited, secret) == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["ratelimit-remaining"] == "0"
    assert "www-authenticate" not in limited.headers


async def test_health_is_204_never_200(app: App) -> None:
    """200 is Envoy's "allowed": an answer a client path could reach must never be it."""
    answer = await ask(app.http_port, "GET", "/healthz")
    assert (answer.status, answer.body) == (204, b"")


async def test_a_cache_hit_is_answered_synchronously_a_miss_after_the_lookup(app: App, stub: Stub) -> None:
    """The fast path never awaits: the handler hands back the answer itself, no task, no suspension."""
    _, secret, _ = await create(stub, ["read"])
    adapter = HttpAuthorizationAdapter(app.authorizer, app.routes)
    request = Request("GET", "/check/x", {"x-api-key": secret})  # a new key: not cached yet
    miss = adapter(request)
    assert not isinstance(miss, Response)
    assert (await miss).status == 200
    hit = adapter(request)
    assert isinstance(hit, Response)
    assert hit.status == 200
    assert adapter(request) is hit  # memoized per principal: the encoded bytes are reused


# Fail closed ------------------------------------------------------------------


@pytest.fixture
async def proxied(settings: Settings, database_url: str) -> AsyncIterator[tuple[App, TcpProxy]]:
    async with behind_a_proxy(settings, database_url) as replica:
        yield replica


async def test_database_down_is_503_fast_for_cached_and_unknown_keys_and_health_follows(
    proxied: tuple[App, TcpProxy], stub: Stub
) -> None:
    app, proxy = proxied
    _, cached, _ = await create(stub, ["read"])  # created through the shared app: same database
    assert (await ask(app.http_port, "GET", "/check/x", {"x-api-key": cached})).status == 200
    unknown = KeyFormat("authsvc").generate().secret
    proxy.cut()
    try:
        for key in (cached, unknown):
            started = time.monotonic()
            answer = await ask(app.http_port, "GET", "/check/x", {"x-api-key": key})
            assert answer.status == 503
            assert error_code(answer, key) == "unavailable"
            assert time.monotonic() - started < 0.2 + app.settings.store_timeout_ms / 1000  # inside Envoy's timeout
        deadline = time.monotonic() + 5
        while (await ask(app.http_port, "GET", "/healthz")).status != 503:
            assert time.monotonic() < deadline, "HTTP health did not report the database down"
            await asyncio.sleep(0.1)
    finally:
        proxy.restore()
    deadline = time.monotonic() + 10
    while (await ask(app.http_port, "GET", "/check/x", {"x-api-key": cached})).status != 200:
        assert time.monotonic() < deadline, "no recovery after the database came back"
        await asyncio.sleep(0.1)
    while (await ask(app.http_port, "GET", "/healthz")).status != 204:
        assert time.monotonic() < deadline, "HTTP health did not recover with the database"
        await asyncio.sleep(0.1)
