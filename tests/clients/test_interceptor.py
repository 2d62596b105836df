"""The gRPC server interceptors: a real ``grpc.server`` and ``grpc.aio.server``, protected, called over a real channel.

Every test runs against both server kinds. The demo service speaks raw
bytes (no serializers) and answers with the principal its handler sees
through ``current_principal()``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from authsvc_client import (
    AsyncAuthzServerInterceptor,
    AsyncClient,
    AuthzServerInterceptor,
    Client,
    current_principal,
)
from authsvc_client.v1 import authsvc_pb2 as pb

from tests.clients.conftest import Keys, create_key
from tests.support import ADMIN, Stub, new_org

SCOPES = {
    "/demo.Echo/Whoami": "read",
    "/demo.Echo/Count": "read",
    "/demo.Echo/Admin": "write",
    "/demo.Echo/Misconfigured": "no-such-scope",
    "/demo.Echo/AnyKey": "",  # explicitly: any valid key
}
PUBLIC = {"/demo.Echo/Ping"}
# "/demo.Echo/Unlisted" has no rule on purpose.
METHODS = ["Whoami", "Admin", "Ping", "Unlisted", "Misconfigured", "AnyKey"]


def _seen() -> bytes:
    principal = current_principal()
    if principal is None:
        return b"null"
    seen: dict[str, object] = {"key_id": principal.key_id, "org_id": principal.org_id}
    if principal.labels:
        seen["labels"] = dict(principal.labels)
    return json.dumps(seen).encode()


def _sync_service() -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return _seen()

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(3):
            yield _seen()

    handlers: dict[str, Any] = {name: grpc.unary_unary_rpc_method_handler(unary) for name in METHODS}
    handlers["Count"] = grpc.unary_stream_rpc_method_handler(count)
    return grpc.method_handlers_generic_handler("demo.Echo", handlers)


def _aio_service() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return _seen()

    async def count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield _seen()

    handlers: dict[str, Any] = {name: grpc.unary_unary_rpc_method_handler(unary) for name in METHODS}
    handlers["Count"] = grpc.unary_stream_rpc_method_handler(count)
    return grpc.method_handlers_generic_handler("demo.Echo", handlers)


@contextlib.asynccontextmanager
async def protected_server(kind: str, authsvc: str) -> AsyncIterator[str]:
    """The demo service on a free port behind the interceptor of ``kind``, asking authsvc at ``authsvc``."""
    if kind == "sync":
        client = Client(authsvc)
        # Two workers: calls reuse threads, so a leaked principal would show.
        server = grpc.server(
            ThreadPoolExecutor(max_workers=2),
            interceptors=[AuthzServerInterceptor(client, SCOPES, public=PUBLIC)],
        )
        server.add_generic_rpc_handlers([_sync_service()])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(None)
            client.close()
    else:
        async with AsyncClient(authsvc) as aclient:
            aserver = grpc.aio.server(interceptors=[AsyncAuthzServerInterceptor(aclient, SCOPES, public=PUBLIC)])
            aserver.add_generic_rpc_handlers([_aio_service()])
            port = aserver.add_insecure_port("127.0.0.1:0")
            await aserver.start()
            try:
                yield f"127.0.0.1:{port}"
            finally:
                await aserver.stop(None)


@pytest.fixture(params=["sync", "aio"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def service(kind: str, target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the protected demo service."""
    async with protected_server(kind, target) as address, grpc.aio.insecure_channel(address) as channel:
        yield channel


def _raw(data: bytes) -> bytes:
    return data


async def call(channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    reply = await channel.unary_unary(f"/demo.Echo/{method}", request_serializer=_raw, response_deserializer=_raw)(
        b"", metadata=metadata, timeout=5
    )
    return json.loads(reply)


async def status_of(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, method, metadata)
    assert caught.value.details() is not None
    return caught.value


async def test_allowed_call_reaches_the_handler_with_its_principal(service: grpc.aio.Channel, keys: Keys) -> None:
    seen = await call(service, "Whoami", (("x-api-key", keys.reader),))
    assert seen == {"key_id": keys.reader_id, "org_id": keys.org}


async def test_the_handler_sees_the_keys_labels_on_its_principal(service: grpc.aio.Channel, stub: Stub) -> None:
    """Issue 13: the interceptor's principal carries the key's labels."""
    created = await stub.CreateKey(
        pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="labelled", scopes=["read"], labels={"tier": "gold"})
    )
    seen = await call(service, "Whoami", (("x-api-key", created.secret),))
    assert seen["labels"] == {"tier": "gold"}


async def test_authorization_apikey_form_is_accepted(service: grpc.aio.Channel, keys: Keys) -> None:
    seen = await call(service, "Whoami", (("authorization", f"ApiKey {keys.reader}"),))
    assert seen["key_id"] == keys.reader_id


async def test_streaming_handler_sees_the_principal_on_every_message(service: grpc.aio.Channel, keys: Keys) -> None:
    count = service.unary_stream("/demo.Echo/Count", request_serializer=_raw, response_deserializer=_raw)
    stream = count(b"", metadata=(("x-api-key", keys.reader),), timeout=5)
    replies = [json.loads(r) async for r in stream]
    assert [r["key_id"] for r in replies] == [keys.reader_id] * 3


@pytest.mark.parametrize("which", ["missing", "malformed", "unknown", "revoked"])
async def test_401_class_denials_abort_with_unauthenticated(service: grpc.aio.Channel, keys: Keys, which: str) -> None:
    key = {"missing": "", "malformed": "not-a-key"}.get(which, getattr(keys, which, ""))
    metadata = (("x-api-key", key),) if key else ()
    error = await status_of(service, "Whoami", metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() and (not key or key not in (error.details() or ""))


async def test_two_different_keys_are_unauthenticated(service: grpc.aio.Channel, keys: Keys) -> None:
    both = (("x-api-key", keys.reader), ("authorization", f"ApiKey {keys.writer}"))
    error = await status_of(service, "Whoami", both)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "two different" in (error.details() or "")


async def test_insufficient_scope_aborts_with_permission_denied(service: grpc.aio.Channel, keys: Keys) -> None:
    error = await status_of(service, "Admin", (("x-api-key", keys.reader),))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # The same method lets a key with the scope through.
    seen = await call(service, "Admin", (("x-api-key", keys.writer),))
    assert seen["org_id"] == keys.org and seen["key_id"] != keys.reader_id


async def test_method_without_a_rule_is_denied_even_with_a_good_key(service: grpc.aio.Channel, keys: Keys) -> None:
    error = await status_of(service, "Unlisted", (("x-api-key", keys.writer),))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no authorization rule" in (error.details() or "")


async def test_public_method_needs_no_key_and_never_sees_an_earlier_principal(
    service: grpc.aio.Channel, keys: Keys
) -> None:
    for _ in range(3):  # more calls than worker threads: every thread served an authenticated call first
        await call(service, "Whoami", (("x-api-key", keys.reader),))
        assert await call(service, "Ping") is None


async def test_rule_naming_an_unknown_scope_fails_closed_with_internal(service: grpc.aio.Channel, keys: Keys) -> None:
    error = await status_of(service, "Misconfigured", (("x-api-key", keys.writer),))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert keys.writer not in (error.details() or "")


async def test_rate_limited_key_gets_resource_exhausted_with_retry_after(service: grpc.aio.Channel, stub: Stub) -> None:
    limited = await create_key(stub, new_org(), ["read"], rate_limit=1)
    await call(service, "Whoami", (("x-api-key", limited.secret),))
    error = await status_of(service, "Whoami", (("x-api-key", limited.secret),))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1


async def test_unreachable_authsvc_fails_closed_with_unavailable(kind: str, dead_target: str, keys: Keys) -> None:
    async with protected_server(kind, dead_target) as address, grpc.aio.insecure_channel(address) as channel:
        error = await status_of(channel, "Whoami", (("x-api-key", keys.reader),))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert keys.reader not in (error.details() or "")
        # Public methods do not depend on authsvc.
        assert await call(channel, "Ping") is None


async def test_a_rule_with_an_empty_scope_authenticates_any_valid_key(service: grpc.aio.Channel, keys: Keys) -> None:
    """``""`` goes through the client's explicit ``authenticate``: a valid key passes, others do not."""
    seen = await call(service, "AnyKey", (("x-api-key", keys.reader),))
    assert seen == {"key_id": keys.reader_id, "org_id": keys.org}
    error = await status_of(service, "AnyKey", (("x-api-key", keys.revoked),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await status_of(service, "Unlisted", (("x-api-key", keys.reader),))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
