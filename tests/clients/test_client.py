"""The typed helpers (``Client``, ``AsyncClient``) against the real in-process authsvc."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from authsvc_client import (
    AsyncClient,
    AuthsvcError,
    Client,
    Decision,
    InvalidArgument,
    Principal,
    RateLimit,
    Reason,
    Unavailable,
)

from tests.clients.conftest import Keys, create_key
from tests.support import Stub, new_org

# (which key, required scope, expected reason, expected HTTP status)
DENIALS = [
    ("missing", "read", Reason.MISSING_KEY, 401),
    ("malformed", "read", Reason.MALFORMED_KEY, 401),
    ("unknown", "read", Reason.UNKNOWN_KEY, 401),
    ("revoked", "read", Reason.REVOKED, 401),
    ("reader", "write", Reason.INSUFFICIENT_SCOPE, 403),
]


def secret(keys: Keys, which: str) -> str:
    fixed = {"missing": "", "malformed": "not-a-key"}
    return fixed[which] if which in fixed else str(getattr(keys, which))


async def test_async_allowed_returns_the_principal(target: str, keys: Keys) -> None:
    async with AsyncClient(target) as client:
        decision = await client.authorize(keys.reader, "read")
    assert decision.allowed and decision.reason is Reason.OK and decision.http_status == 200
    assert decision.principal == Principal(
        key_id=keys.reader_id,
        org_id=keys.org,
        user_id="alice",
        scopes=("read",),
        key_prefix=keys.reader[:12],
        key_name="clients-test",
    )


async def test_async_principal_carries_the_keys_labels_frozen_and_hashable(target: str, stub: Stub) -> None:
    """Issue 13: ``Principal.labels`` as sorted (name, value) pairs, read by name with ``label()``."""
    from authsvc_client.v1 import authsvc_pb2 as pb

    from tests.support import ADMIN

    created = await stub.CreateKey(
        pb.CreateKeyRequest(
            org_id=new_org(), actor=ADMIN, name="labelled", scopes=["read"], labels={"tier": "gold", "env": "prod"}
        )
    )
    async with AsyncClient(target) as client:
        decision = await client.authorize(created.secret, "read")
    principal = decision.principal
    assert principal is not None and principal.labels == (("env", "prod"), ("tier", "gold"))
    assert (principal.label("tier"), principal.label("missing"), principal.label("missing", "-")) == ("gold", None, "-")
    assert dict(principal.labels) == {"env": "prod", "tier": "gold"}
    assert hash(principal) == hash(decision.principal)  # frozen: usable as a cache key
    with pytest.raises(AttributeError):
        principal.labels = ()  # type: ignore[misc]


async def test_async_authenticate_checks_only_the_key_and_expands_implied_scopes(target: str, keys: Keys) -> None:
    async with AsyncClient(target) as client:
        decision = await client.authenticate(keys.writer)
        revoked = await client.authenticate(keys.revoked)
    assert decision.allowed
    assert decision.principal is not None and set(decision.principal.scopes) == {"read", "write"}
    assert (revoked.allowed, revoked.reason, revoked.http_status) == (False, Reason.REVOKED, 401)


@pytest.mark.parametrize("scope", ["", "  "])
async def test_authorize_refuses_an_empty_scope_and_points_to_authenticate(
    target: str, dead_target: str, keys: Keys, scope: str
) -> None:
    """Forgetting the scope must not allow any valid key: it is a caller bug, found before any call."""
    async with AsyncClient(target) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.authorize(keys.writer, scope)
    assert "authenticate(key)" in str(caught.value) and caught.value.status == "INVALID_ARGUMENT"
    assert keys.writer not in str(caught.value)

    def sync_on_a_dead_target() -> None:  # refused without a call: no server needed to say so
        with Client(dead_target) as client:
            client.authorize(keys.writer, scope)

    with pytest.raises(InvalidArgument, match=r"authenticate\(key\)"):
        await asyncio.to_thread(sync_on_a_dead_target)


async def test_sync_authenticate_gives_the_same_answers(target: str, keys: Keys) -> None:
    def run() -> list[Decision]:
        with Client(target) as client:
            return [client.authenticate(secret(keys, which)) for which in ("reader", "unknown", "revoked", "missing")]

    decisions = await asyncio.to_thread(run)
    assert [d.reason for d in decisions] == [Reason.OK, Reason.UNKNOWN_KEY, Reason.REVOKED, Reason.MISSING_KEY]
    assert decisions[0].principal is not None and decisions[0].principal.key_id == keys.reader_id


@pytest.mark.parametrize(("which", "scope", "reason", "status"), DENIALS)
async def test_async_denials_are_answers_with_reason_and_status(
    target: str, keys: Keys, which: str, scope: str, reason: Reason, status: int
) -> None:
    key = secret(keys, which)
    async with AsyncClient(target) as client:
        decision = await client.authorize(key, scope)
    assert (decision.allowed, decision.reason, decision.http_status) == (False, reason, status)
    assert decision.message and (not key or key not in decision.message)


async def test_async_identified_keys_carry_their_principal_even_when_denied(target: str, keys: Keys) -> None:
    async with AsyncClient(target) as client:
        decision = await client.authorize(keys.reader, "write")
    assert decision.principal is not None and decision.principal.key_id == keys.reader_id


async def test_async_unknown_required_scope_raises_invalid_argument(target: str, keys: Keys) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.authorize(keys.reader, "no-such-scope")
    assert caught.value.status == "INVALID_ARGUMENT"
    assert keys.reader not in str(caught.value)


async def test_async_unreachable_server_raises_unavailable(dead_target: str, keys: Keys) -> None:
    async with AsyncClient(dead_target) as client:
        with pytest.raises(Unavailable) as caught:
            await client.authorize(keys.reader, "read")
    assert isinstance(caught.value, AuthsvcError)
    assert isinstance(caught.value.__cause__, grpc.RpcError)  # kept for logs, never needed to handle the error
    assert keys.reader not in str(caught.value)


async def test_async_server_that_does_not_answer_in_time_raises_unavailable(keys: Keys) -> None:
    """No answer before the deadline is handled exactly like no server: Unavailable, fail closed."""
    release = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await release.wait()
        return b""

    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {"Authorize": grpc.unary_unary_rpc_method_handler(hang)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("authsvc.v1.KeyService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=0.1) as client:
            with pytest.raises(Unavailable) as caught:
                await client.authorize(keys.reader, "read")
        assert caught.value.status == "DEADLINE_EXCEEDED"
    finally:
        release.set()
        await server.stop(None)


async def test_async_rate_limited_key_is_denied_with_429_and_its_window(target: str, stub: Stub) -> None:
    limited = await create_key(stub, new_org(), ["read"], rate_limit=1)
    async with AsyncClient(target) as client:
        first = await client.authorize(limited.secret, "read")
        second = await client.authorize(limited.secret, "read")
    assert first.allowed and first.rate_limit is not None and first.rate_limit.limit == 1
    assert (second.allowed, second.reason, second.http_status) == (False, Reason.RATE_LIMITED, 429)
    assert second.rate_limit is not None and second.rate_limit.remaining == 0 and second.rate_limit.reset_seconds > 0


async def test_async_client_on_a_caller_owned_channel_leaves_it_open(target: str, keys: Keys) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        async with AsyncClient(channel) as client:
            assert (await client.authorize(keys.reader, "read")).allowed
        # The client did not close what it does not own.
        assert (await AsyncClient(channel).authorize(keys.reader, "read")).allowed


async def test_sync_client_gives_the_same_answers(target: str, keys: Keys) -> None:
    """The blocking client runs in a worker thread: the in-process server needs the event loop free."""

    def run() -> list[Decision]:
        with Client(target) as client:
            return [client.authorize(keys.reader, "read")] + [
                client.authorize(secret(keys, which), scope) for which, scope, _, _ in DENIALS
            ]

    allowed, *denied = await asyncio.to_thread(run)
    assert allowed.allowed and allowed.principal is not None and allowed.principal.key_id == keys.reader_id
    assert [(d.allowed, d.reason, d.http_status) for d in denied] == [(False, r, s) for _, _, r, s in DENIALS]


async def test_sync_unknown_scope_and_unreachable_server_raise_typed_errors(
    target: str, dead_target: str, keys: Keys
) -> None:
    def unknown_scope() -> None:
        with Client(target) as client:
            client.authorize(keys.reader, "no-such-scope")

    def unreachable() -> None:
        with Client(dead_target) as client:
            client.authorize(keys.reader, "read")

    with pytest.raises(InvalidArgument):
        await asyncio.to_thread(unknown_scope)
    with pytest.raises(Unavailable):
        await asyncio.to_thread(unreachable)


def test_decision_repr_and_errors_never_show_a_key_passed_with_the_wrong_type() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError) as caught:
        client.authorize(b"authsvc_secretbytes", "read")  # type: ignore[arg-type]  # the wrong type on purpose
    assert "secretbytes" not in str(caught.value)


def test_retry_after_is_the_window_reset_and_at_least_one_second() -> None:
    limited = Decision(Reason.RATE_LIMITED, message="slow down")
    assert limited.retry_after == 1
    window = RateLimit(limit=10, remaining=0, reset_seconds=0)
    assert Decision(limited.reason, rate_limit=window).retry_after == 1
    window = RateLimit(limit=10, remaining=0, reset_seconds=37)
    assert Decision(limited.reason, rate_limit=window).retry_after == 37


async def test_async_client_built_outside_the_event_loop_works_inside_it(target: str, keys: Keys) -> None:
    """As when an ASGI module builds its middleware at import time, before the server starts the loop."""
    client = await asyncio.to_thread(AsyncClient, target)
    try:
        assert (await client.authorize(keys.reader, "read")).allowed
    finally:
        await client.close()
