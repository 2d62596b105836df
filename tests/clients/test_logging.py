"""What the interceptors and the middleware log when authsvc gives no answer: never a key.

authsvc keeps keys out of its error messages, but the client must not rely on
it: these tests use an authsvc (a fake client) whose messages echo the key.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import grpc
import pytest
from authsvc_client import (
    AsyncAuthzServerInterceptor,
    AsyncClient,
    AuthsvcError,
    AuthsvcMiddleware,
    AuthzServerInterceptor,
    Client,
    InternalError,
    Unavailable,
)
from authsvc_client._credentials import loggable

from tests.clients.test_asgi import request as asgi_request

SECRET = "authsvc_" + "Q7x" * 16 + "abc"
METHOD = "/demo.v1.Notes/Read"

# (the error authsvc's answer became, the level it is logged at, the status name logged)
FAILURES = [
    (InternalError(f"could not check key {SECRET}", status="INTERNAL"), logging.ERROR, "INTERNAL"),
    (
        Unavailable(f"store down while checking {SECRET}\nforged line", status="UNAVAILABLE"),
        logging.WARNING,
        "UNAVAILABLE",
    ),
]


class EchoingAuthsvc:
    """Stands in for Client and AsyncClient: every call fails with a message that contains the key."""

    def __init__(self, error: AuthsvcError) -> None:
        self.error = error

    def authorize(self, key: str, scope: str = "") -> Any:
        raise self.error


class AsyncEchoingAuthsvc(EchoingAuthsvc):
    async def authorize(self, key: str, scope: str = "") -> Any:
        raise self.error


class Details(grpc.HandlerCallDetails):
    def __init__(self) -> None:
        self.method = METHOD
        self.invocation_metadata = (("x-api-key", SECRET),)


class Aborted(Exception):
    pass


class Context:
    def set_trailing_metadata(self, trailers: Any) -> None:
        pass

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code)


def assert_logged_safely(caplog: pytest.LogCaptureFixture, level: int, status: str) -> None:
    [record] = [r for r in caplog.records if r.name == "authsvc_client"]
    text = record.getMessage()
    assert record.levelno == level and f"({status})" in text
    assert SECRET not in text and SECRET[8:24] not in text and "\n" not in text


def test_loggable_redacts_the_key_and_anything_shaped_like_one() -> None:
    text = loggable(f"scope 'billing:read' unknown; key {SECRET}; other Zk9{'x' * 30}; short hunter2", "hunter2")
    assert text == "scope 'billing:read' unknown; key authsvc_<redacted>; other <redacted>; short <redacted>"


def test_loggable_flattens_lines_and_caps_the_length() -> None:
    text = loggable("line one\nline two " + "word " * 100, "")
    assert text.startswith("line one line two word") and "\n" not in text
    assert len(text) == 200 and text.endswith("…")


@pytest.mark.parametrize(("error", "level", "status"), FAILURES)
def test_sync_interceptor_logs_status_never_the_key(
    caplog: pytest.LogCaptureFixture, error: AuthsvcError, level: int, status: str
) -> None:
    interceptor = AuthzServerInterceptor(cast(Client, EchoingAuthsvc(error)), {METHOD: "read"})
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
    guarded = interceptor.intercept_service(lambda details: handler, Details())
    assert guarded is not None and guarded.unary_unary is not None
    with caplog.at_level(logging.WARNING), pytest.raises(Aborted):
        guarded.unary_unary(b"", cast(grpc.ServicerContext, Context()))
    assert_logged_safely(caplog, level, status)


@pytest.mark.parametrize(("error", "level", "status"), FAILURES)
async def test_async_interceptor_logs_status_never_the_key(
    caplog: pytest.LogCaptureFixture, error: AuthsvcError, level: int, status: str
) -> None:
    interceptor = AsyncAuthzServerInterceptor(cast(AsyncClient, AsyncEchoingAuthsvc(error)), {METHOD: "read"})
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return handler

    with caplog.at_level(logging.WARNING):
        await interceptor.intercept_service(continuation, Details())
    assert_logged_safely(caplog, level, status)


@pytest.mark.parametrize(("error", "level", "status"), FAILURES)
async def test_middleware_logs_status_never_the_key(
    caplog: pytest.LogCaptureFixture, error: AuthsvcError, level: int, status: str
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the application must not be called")

    middleware = AuthsvcMiddleware(
        app, client=cast(AsyncClient, AsyncEchoingAuthsvc(error)), scopes=[("*", "/", "read")]
    )
    with caplog.at_level(logging.WARNING):
        response = await asgi_request(middleware, "GET", "/notes", [("x-api-key", SECRET)])
    assert response.status in (500, 503) and SECRET.encode() not in response.body
    assert_logged_safely(caplog, level, status)
