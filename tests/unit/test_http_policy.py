"""One HTTP policy, every front end: the same status, code, headers and body for every reason.

The Envoy Check adapter, the ASGI middleware and both gRPC interceptors
render a denial through ``authsvc_client._http``; this table asserts that
each gives exactly what the policy says, for every denying reason, for a
rate-limited key with its window, and for a request with two keys. (The
real servers behind each adapter are exercised in their own test folders.)
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import grpc
import pytest
from authsvc_client import AsyncAuthzServerInterceptor, AuthsvcMiddleware, AuthzServerInterceptor
from authsvc_client._decision import MESSAGES, TWO_KEYS, Decision, Principal, RateLimit, Reason
from authsvc_client._http import Answer, HttpPolicy

from tests.extauthz.test_mapping import make_adapter

POLICY = HttpPolicy()
PRINCIPAL = Principal("key-1", "acme", "alice", ("read",), "authsvc_abcd", "ci")
DENIALS = [
    *(
        Decision(r, PRINCIPAL if r not in (Reason.MISSING_KEY, Reason.MALFORMED_KEY) else None)
        for r in Reason
        if r not in (Reason.OK, Reason.UNSPECIFIED)
    ),
    Decision(Reason.RATE_LIMITED, PRINCIPAL, RateLimit(limit=100, remaining=0, reset_seconds=17)),
]
EXPECTED_STATUS = {
    Reason.MISSING_KEY: 401,
    Reason.MALFORMED_KEY: 401,
    Reason.UNKNOWN_KEY: 401,
    Reason.REVOKED: 401,
    Reason.EXPIRED: 401,
    Reason.INSUFFICIENT_SCOPE: 403,
    Reason.RATE_LIMITED: 429,
}
GRPC = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
KEY = "authsvc_" + "k" * 49


def ids(decision: Decision) -> str:
    return f"{decision.reason.name.lower()}{'-window' if decision.rate_limit else ''}"


class Answers:
    """A stand-in for ``Client``/``AsyncClient`` that answers one fixed decision (the front ends are under test)."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def authorize(self, key: str, scope: str) -> Any:
        decision = self.decision

        class Awaitable:
            def __await__(self) -> Any:
                yield from ()
                return decision

        return Awaitable() if isinstance(self, AsyncAnswers) else decision


class AsyncAnswers(Answers):
    pass


def test_the_policy_follows_the_reason_table() -> None:
    for decision in DENIALS:
        answer = POLICY.denial(decision)
        assert answer.status == EXPECTED_STATUS[decision.reason]
        assert json.loads(answer.body) == {
            "error": {"code": decision.reason.code, "message": MESSAGES[decision.reason]}
        }
        headers = dict(answer.headers)
        assert headers["content-type"] == "application/json"
        assert ("www-authenticate" in headers) is (answer.status == 401)
        assert ("retry-after" in headers) is (answer.status == 429)


def test_denials_are_built_once_per_reason() -> None:
    assert POLICY.denial(Decision(Reason.REVOKED, PRINCIPAL)) is POLICY.denial(Decision(Reason.REVOKED))


@pytest.mark.parametrize("decision", [*DENIALS, TWO_KEYS], ids=[*map(ids, DENIALS), "two-keys"])
def test_envoy_check_renders_exactly_the_policy(decision: Decision) -> None:
    expected = POLICY.denial(decision)
    response = make_adapter().denied(decision)
    denied = response.denied_response
    assert (denied.status.code, response.status.code) == (expected.status, expected.grpc_code)
    assert [(h.header.key, h.header.value) for h in denied.headers] == list(expected.headers)
    assert denied.body.encode() == expected.body


async def asgi_answer(
    decision: Decision, headers: list[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[str, str]], bytes]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a denied request reached the application")

    middleware = AuthsvcMiddleware(app, client=AsyncAnswers(decision), scopes=[("*", "/", "read")])  # type: ignore[arg-type]
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/items", "headers": headers}
    await middleware(scope, receive, send)
    start, body = sent
    return start["status"], [(k.decode(), v.decode()) for k, v in start["headers"]], body["body"]


@pytest.mark.parametrize("decision", [*DENIALS, TWO_KEYS], ids=[*map(ids, DENIALS), "two-keys"])
async def test_asgi_middleware_renders_exactly_the_policy(decision: Decision) -> None:
    expected = POLICY.denial(decision)
    headers = [(b"x-api-key", KEY.encode())]
    if decision is TWO_KEYS:
        headers.append((b"authorization", f"ApiKey {KEY[:-1]}X".encode()))
    status, sent_headers, body = await asgi_answer(decision, headers)
    assert status == expected.status
    assert [h for h in sent_headers if h[0] != "content-length"] == list(expected.headers)
    assert body == expected.body


class Aborted(Exception):
    pass


class Context:
    """What a servicer context records of an abort."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = None) -> Any:
        self.code, self.details = code, details
        if trailing_metadata is not None:
            self.trailers = trailing_metadata
        if isinstance(self, AsyncContext):

            async def raising() -> None:
                raise Aborted

            return raising()
        raise Aborted


class AsyncContext(Context):
    pass


class CallDetails(grpc.HandlerCallDetails):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = "/x.Y/Z"
        self.invocation_metadata = metadata


def handler() -> Any:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: "reached")


def expect_grpc(answer: Answer, context: Context) -> None:
    assert context.code == GRPC[answer.status]
    assert context.details == answer.message
    retry_after = dict(answer.headers).get("retry-after")
    assert dict(context.trailers).get("retry-after") == retry_after


def metadata_for(decision: Decision) -> tuple[tuple[str, str], ...]:
    if decision is TWO_KEYS:
        return (("x-api-key", KEY), ("authorization", f"ApiKey {KEY[:-1]}X"))
    return (("x-api-key", KEY),)


@pytest.mark.parametrize("decision", [*DENIALS, TWO_KEYS], ids=[*map(ids, DENIALS), "two-keys"])
def test_grpc_interceptor_renders_exactly_the_policy(decision: Decision) -> None:
    interceptor = AuthzServerInterceptor(Answers(decision), {"/x.Y/Z": "read"})  # type: ignore[arg-type]
    guarded = interceptor.intercept_service(lambda details: handler(), CallDetails(metadata_for(decision)))
    assert guarded is not None
    context = Context()
    with pytest.raises(Aborted):
        guarded.unary_unary(object(), context)  # type: ignore[misc, arg-type]  # a recording context
    expect_grpc(POLICY.denial(decision), context)


@pytest.mark.parametrize("decision", [*DENIALS, TWO_KEYS], ids=[*map(ids, DENIALS), "two-keys"])
async def test_async_grpc_interceptor_renders_exactly_the_policy(decision: Decision) -> None:
    interceptor = AsyncAuthzServerInterceptor(AsyncAnswers(decision), {"/x.Y/Z": "read"})  # type: ignore[arg-type]

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return handler()

    aborting = await interceptor.intercept_service(continuation, CallDetails(metadata_for(decision)))
    context = AsyncContext()
    with pytest.raises(Aborted):
        await aborting.unary_unary(object(), context)
    expect_grpc(POLICY.denial(decision), context)
