"""The ASGI middleware, driven through the real ASGI protocol against the real authsvc.

Each request is a ``scope`` / ``receive`` / ``send`` exchange with the
middleware, exactly what an ASGI server (uvicorn, hypercorn) does; the
wrapped application records what it was given.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from authsvc_client import AsyncClient, AuthsvcMiddleware, Principal, Reason, current_principal

from tests.clients.conftest import Keys, create_key
from tests.support import Stub, new_org

RULES = [
    ("*", "/misconfigured", "no-such-scope"),
    ("*", "/admin", "write"),
    ("GET", "/", "read"),
    ("POST", "/", "write"),
]  # DELETE has no rule on purpose.
PUBLIC = ["/healthz"]


@dataclass
class Recorder:
    """The protected application: answers 200 and remembers what reached it."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.calls.append({"type": "lifespan"})
            return
        self.calls.append(
            {
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "state": scope.get("state", {}),
                "contextvar": current_principal(),
            }
        )
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        assert self.headers["content-type"] == "application/json"
        result: dict[str, str] = json.loads(self.body)["error"]
        return result


async def request(
    app: Any, method: str, path: str, headers: list[tuple[str, str]] | None = None, *, scope_type: str = "http"
) -> Response:
    scope = {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or []],
        "state": {"from_lifespan": "kept"},
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], sent[1]
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return Response(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body["body"])


@pytest.fixture
async def client(target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target) as c:
        yield c


@pytest.fixture
def upstream() -> Recorder:
    return Recorder()


@pytest.fixture
def protected(upstream: Recorder, client: AsyncClient) -> AuthsvcMiddleware:
    return AuthsvcMiddleware(upstream, client=client, scopes=RULES, public=PUBLIC)


async def test_allowed_request_reaches_the_app_with_principal_and_without_the_key(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys
) -> None:
    response = await request(protected, "GET", "/projects", [("x-api-key", keys.reader), ("accept", "text/plain")])
    assert (response.status, response.body) == (200, b"ok")
    [seen] = upstream.calls
    principal = seen["state"]["authsvc_principal"]
    assert isinstance(principal, Principal) and principal.key_id == keys.reader_id and principal.org_id == keys.org
    assert seen["contextvar"] == principal
    assert seen["state"]["from_lifespan"] == "kept"
    assert seen["headers"] == {"accept": "text/plain"}
    assert current_principal() is None  # nothing left behind after the request


async def test_the_principal_the_app_sees_carries_the_keys_labels(
    protected: AuthsvcMiddleware, upstream: Recorder, stub: Stub
) -> None:
    """Issue 13: labels reach the protected application on its principal."""
    from authsvc_client.v1 import authsvc_pb2 as pb

    from tests.support import ADMIN

    created = await stub.CreateKey(
        pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="asgi", scopes=["read"], labels={"tier": "gold"})
    )
    response = await request(protected, "GET", "/projects", [("x-api-key", created.secret)])
    assert response.status == 200
    [seen] = upstream.calls
    assert seen["state"]["authsvc_principal"].labels == (("tier", "gold"),)
    assert seen["contextvar"].label("tier") == "gold"


async def test_authorization_apikey_is_accepted_and_stripped_but_other_authorization_is_kept(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys
) -> None:
    assert (await request(protected, "GET", "/p", [("authorization", f"ApiKey {keys.reader}")])).status == 200
    with_bearer = [("x-api-key", keys.reader), ("authorization", "Bearer user-jwt")]
    assert (await request(protected, "GET", "/p", with_bearer)).status == 200
    assert upstream.calls[0]["headers"] == {}
    assert upstream.calls[1]["headers"] == {"authorization": "Bearer user-jwt"}


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("missing", Reason.MISSING_KEY),
        ("malformed", Reason.MALFORMED_KEY),
        ("unknown", Reason.UNKNOWN_KEY),
        ("revoked", Reason.REVOKED),
    ],
)
async def test_unauthenticated_requests_get_401_with_challenge_and_json(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys, which: str, reason: Reason
) -> None:
    key = {"missing": "", "malformed": "not-a-key"}.get(which, getattr(keys, which, ""))
    response = await request(protected, "GET", "/projects", [("x-api-key", key)] if key else [])
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("ApiKey ")
    assert response.error()["code"] == reason.code
    assert not key or key.encode() not in response.body
    assert upstream.calls == []


async def test_two_different_keys_get_401_malformed(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys
) -> None:
    both = [("x-api-key", keys.reader), ("authorization", f"ApiKey {keys.writer}")]
    response = await request(protected, "GET", "/projects", both)
    assert (response.status, response.error()["code"]) == (401, "malformed_key")
    assert upstream.calls == []


async def test_missing_scope_gets_403(protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys) -> None:
    response = await request(protected, "POST", "/projects", [("x-api-key", keys.reader)])
    assert (response.status, response.error()["code"]) == (403, "insufficient_scope")
    assert "www-authenticate" not in response.headers
    assert (await request(protected, "POST", "/projects", [("x-api-key", keys.writer)])).status == 200


async def test_path_rules_match_whole_segments(protected: AuthsvcMiddleware, keys: Keys) -> None:
    reader = [("x-api-key", keys.reader)]
    assert (await request(protected, "GET", "/admin/users", reader)).status == 403
    assert (await request(protected, "GET", "/administrator", reader)).status == 200  # falls to GET / -> read


async def test_request_no_rule_covers_is_denied(protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys) -> None:
    response = await request(protected, "DELETE", "/projects/1", [("x-api-key", keys.writer)])
    assert (response.status, response.error()["code"]) == (403, "forbidden")
    assert upstream.calls == []


async def test_dot_segments_are_refused_before_any_rule(protected: AuthsvcMiddleware, upstream: Recorder) -> None:
    response = await request(protected, "GET", "/healthz/../admin")
    assert (response.status, response.error()["code"]) == (400, "bad_path")
    assert upstream.calls == []


async def test_public_path_needs_no_key_and_still_never_sees_one(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys
) -> None:
    assert (await request(protected, "GET", "/healthz")).status == 200
    assert (await request(protected, "GET", "/healthz/live", [("x-api-key", keys.reader)])).status == 200
    assert [c["state"]["authsvc_principal"] for c in upstream.calls] == [None, None]
    assert upstream.calls[1]["headers"] == {}


async def test_rate_limited_key_gets_429_with_retry_after(
    protected: AuthsvcMiddleware, upstream: Recorder, stub: Stub
) -> None:
    limited = await create_key(stub, new_org(), ["read"], rate_limit=1)
    first = await request(protected, "GET", "/projects", [("x-api-key", limited.secret)])
    second = await request(protected, "GET", "/projects", [("x-api-key", limited.secret)])
    assert first.status == 200  # and the response tells the client where it stands
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("1", "0")
    assert (second.status, second.error()["code"]) == (429, "rate_limited")
    assert int(second.headers["retry-after"]) >= 1
    assert len(upstream.calls) == 1


async def test_rule_naming_an_unknown_scope_answers_500_not_the_app(
    protected: AuthsvcMiddleware, upstream: Recorder, keys: Keys
) -> None:
    response = await request(protected, "GET", "/misconfigured", [("x-api-key", keys.writer)])
    assert (response.status, response.error()["code"]) == (500, "internal_error")
    assert upstream.calls == []


async def test_unreachable_authsvc_answers_503_never_the_app(dead_target: str, upstream: Recorder, keys: Keys) -> None:
    async with AsyncClient(dead_target) as dead:
        app = AuthsvcMiddleware(upstream, client=dead, scopes=RULES, public=PUBLIC)
        response = await request(app, "GET", "/projects", [("x-api-key", keys.reader)])
        assert (response.status, response.error()["code"]) == (503, "unavailable")
        assert "retry-after" in response.headers and keys.reader.encode() not in response.body
        assert upstream.calls == []
        assert (await request(app, "GET", "/healthz")).status == 200  # public paths do not depend on authsvc


async def test_scopes_can_be_a_callable(client: AsyncClient, upstream: Recorder, keys: Keys) -> None:
    def resolve(method: str, path: str) -> str | None:
        return "write" if path.startswith("/w") else None

    app = AuthsvcMiddleware(upstream, client=client, scopes=resolve)
    assert (await request(app, "GET", "/w", [("x-api-key", keys.writer)])).status == 200
    assert (await request(app, "GET", "/w", [("x-api-key", keys.reader)])).status == 403
    assert (await request(app, "GET", "/r", [("x-api-key", keys.writer)])).status == 403


async def test_websocket_without_key_is_closed_before_the_app(protected: AuthsvcMiddleware, upstream: Recorder) -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "asgi": {"version": "3.0"}}
    await protected(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert upstream.calls == []


async def test_lifespan_passes_through(protected: AuthsvcMiddleware, upstream: Recorder) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        raise AssertionError("the middleware must not answer lifespan itself")

    await protected({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert upstream.calls == [{"type": "lifespan"}]


async def test_a_rule_with_an_empty_scope_authenticates_any_valid_key(
    client: AsyncClient, upstream: Recorder, keys: Keys
) -> None:
    """``""`` is the explicit "any valid key" (the client's ``authenticate``); no rule still means 403."""
    app = AuthsvcMiddleware(upstream, client=client, scopes=[("GET", "/me", "")])
    assert (await request(app, "GET", "/me", [("x-api-key", keys.reader)])).status == 200
    assert (await request(app, "GET", "/me", [("x-api-key", keys.revoked)])).status == 401
    assert (await request(app, "POST", "/me", [("x-api-key", keys.reader)])).status == 403
