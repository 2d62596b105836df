"""Semantics 2 (no secret at rest), 13 (bad input) and 14 (fail closed), and admin tokens."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pgserver
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc.access import AdminToken
from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.runtime import App
from tests.grpc.test_lifecycle import authorize, code_of, create
from tests.replicas import behind_a_proxy
from tests.support import ADMIN, MEMBER, Stub, TcpProxy, free_port, new_org

PG_DUMP = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"


# 2. A full dump of the database contains no secret ------------------------


async def test_2_database_dump_contains_no_secret(stub: Stub, database_url: str, tmp_path: Path) -> None:
    org = new_org()
    secrets = [(await create(stub, org, name=f"k{i}")).secret for i in range(3)]
    for secret in secrets:
        await authorize(stub, secret)
    dump = (
        await asyncio.to_thread(
            subprocess.run, [str(PG_DUMP), "--no-owner", database_url], capture_output=True, check=True
        )
    ).stdout
    assert org.encode() in dump  # the dump really has this test's rows
    for secret in secrets:
        assert secret.encode() not in dump
        assert secret[12:].encode() not in dump  # not even the part after the display prefix
        assert secret[:12].encode() in dump  # the non-secret prefix is there


# 13. Bad input: INVALID_ARGUMENT, a message that says what to fix, nothing written --

LONG = "x" * 10_000
PASTED = (
    KeyFormat("authsvc").generate().secret
)  # a key of the test deployment's format, pasted where it does not belong
BAD_CREATES = [
    ("empty org_id", {"org_id": ""}, "org_id is required"),
    ("org_id with spaces", {"org_id": "acme corp"}, "org_id must be"),
    ("oversized org_id", {"org_id": LONG}, "org_id must be"),
    ("missing actor user", {"actor": pb.Actor(role=pb.ROLE_ADMIN)}, "actor.user_id is required"),
    ("unknown role", {"actor": pb.Actor(user_id="a", role=42)}, "actor.role 42"),  # type: ignore[arg-type]
    ("empty name", {"name": "  "}, "name is required"),
    ("oversized name", {"name": LONG}, "name must be at most 100"),
    ("name with newline", {"name": "ci\nlog-injection"}, "control characters"),
    ("name with escape", {"name": "ci\x1b[31m"}, "control characters"),
    ("huge scope list", {"scopes": ["read"] * 10_000}, "at most 64"),
    ("oversized scope", {"scopes": [LONG]}, "unknown scope"),
    ("negative rate limit", {"rate_limit": -1}, "rate_limit"),
    ("name with line separator", {"name": "ci\u2028log-injection"}, "control characters"),
    (
        "user id with paragraph separator",
        {"actor": pb.Actor(user_id="al\u2029ice", role=pb.ROLE_ADMIN)},
        "actor.user_id",
    ),
    ("key pasted as org_id", {"org_id": PASTED}, "org_id holds an API key"),
    ("key inside the name", {"name": f"for ci: {PASTED}"}, "name holds an API key"),
    ("key as actor user id", {"actor": pb.Actor(user_id=PASTED, role=pb.ROLE_ADMIN)}, "actor.user_id holds an API key"),
]


@pytest.mark.parametrize(("case", "fields", "message"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
async def test_13_bad_create_is_invalid_argument_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection, case: str, fields: dict[str, object], message: str
) -> None:
    org = new_org()
    request: dict[str, object] = {"org_id": org, "actor": ADMIN, "name": "ci", "scopes": ["read"]} | fields
    code, details = await code_of(stub.CreateKey(pb.CreateKeyRequest(**request)))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert len(details) < 400  # says what to fix; does not echo 10 kB back
    assert PASTED not in details and PASTED[12:] not in details
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 0
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org) == 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ListKeysRequest(actor=MEMBER, page=-1), "page must be"),
        (pb.ListKeysRequest(actor=MEMBER, limit=101), "limit must be between 1 and 100"),
        (pb.ListKeysRequest(actor=MEMBER, limit=-5), "limit must be"),
        (pb.ListKeysRequest(actor=MEMBER, state=9), "state 9"),  # type: ignore[arg-type]
    ],
)
async def test_13_bad_paging_is_invalid_argument(stub: Stub, request_: pb.ListKeysRequest, message: str) -> None:
    request_.org_id = new_org()
    code, details = await code_of(stub.ListKeys(request_))
    assert (code, message in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


async def test_13_bad_key_id_and_reason_are_invalid_argument(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    uuid = created.key.id
    # Only the canonical form: no second spelling of an id, no typo that quietly names another key.
    for bad in ("../../etc", f"{{{uuid}}}", f"urn:uuid:{uuid}", uuid.replace("-", ""), uuid[:-2] + "_" + uuid[-1],
                uuid[:-1] + "\u0669"):  # fmt: skip
        code, details = await code_of(stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=bad, actor=MEMBER)))
        assert (code, "key_id must be" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), bad
    code, details = await code_of(
        stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason=f"leaked {PASTED}"))
    )
    assert (code, "reason holds an API key" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)
    code, details = await code_of(
        stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason="r" * 501))
    )
    assert (code, "reason must be at most 500" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)
    assert (await authorize(stub, created.secret)).allowed  # the failed revoke wrote nothing


async def test_13_upper_case_key_id_is_invalid_argument_naming_the_canonical_form(
    stub: Stub, db: asyncpg.Connection
) -> None:
    """One spelling per id: GetKey and RevokeKey refuse an upper-case id, say which to use, and write nothing."""
    org = new_org()
    created = await create(stub, org)
    key_id = created.key.id
    audits = await db.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org)
    letter = next(i for i, ch in enumerate(key_id) if ch in "abcdef")
    one_upper = key_id[:letter] + key_id[letter].upper() + key_id[letter + 1 :]
    for spelling in (key_id.upper(), one_upper):
        for call in (
            stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=spelling, actor=MEMBER)),
            stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=spelling, actor=ADMIN, reason="rotated")),
        ):
            code, details = await code_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "lower-case" in details and key_id in details
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org) == audits
    assert (await authorize(stub, created.secret)).allowed  # not revoked
    assert (await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=key_id, actor=MEMBER))).key.id == key_id


async def test_13_invalid_utf8_is_invalid_argument_not_internal(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/authsvc.v1.KeyService/CreateKey")
    org = new_org().encode()
    # Field 1 (org_id) valid, field 3 (name) with bytes that are not UTF-8.
    payload = b"\x0a" + bytes([len(org)]) + org + b"\x1a\x04\xff\xfe\xfd\xfc"
    code, details = await code_of(raw(payload))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in details
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org.decode()) == 0


async def test_13_garbage_bytes_never_crash_the_server(channel: grpc.aio.Channel, stub: Stub) -> None:
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/authsvc.v1.KeyService/Authorize")
    for payload in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
        code, _ = await code_of(raw(payload))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await authorize(stub, "")).reason == pb.REASON_MISSING_KEY  # still serving


async def test_13_oversized_key_is_malformed_without_hashing_it(stub: Stub) -> None:
    reply = await authorize(stub, "authsvc_" + "a" * 100_000)
    assert (reply.reason, reply.http_status) == (pb.REASON_MALFORMED_KEY, 401)


# Admin tokens ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def guarded(settings: Settings, database_url: str) -> AsyncIterator[App]:
    app = App(
        replace(settings, admin_tokens=(AdminToken("ci", "s3cret-admin-token-0123"),)),
        database_url,
        listen=f"127.0.0.1:{free_port()}",
    )
    await app.start()
    yield app
    await app.stop(grace=0.5)


async def test_admin_token_guards_management_but_not_authorize(guarded: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        request = pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"])
        code, details = await code_of(stub.CreateKey(request))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        code, _ = await code_of(stub.CreateKey(request, metadata=[("authorization", "Bearer wrong")]))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        created = await stub.CreateKey(request, metadata=[("authorization", "Bearer s3cret-admin-token-0123")])
        assert (await authorize(stub, created.secret)).allowed  # Authorize needs no admin token
        # Issue 13's calls are management calls too (every KeyService method but Authorize is).
        org, key_id = request.org_id, created.key.id
        for call in (
            stub.RotateKey(pb.RotateKeyRequest(org_id=org, key_id=key_id, actor=ADMIN)),
            stub.UpdateKey(pb.UpdateKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, name="x")),
            stub.RevokeKeys(pb.RevokeKeysRequest(org_id=org, actor=ADMIN, created_by=ADMIN.user_id)),
        ):
            code, _ = await code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        assert (await authorize(stub, created.secret)).allowed  # none of them did anything


# 14. Fail closed ------------------------------------------------------------


@pytest.fixture
async def proxied(settings: Settings, database_url: str) -> AsyncIterator[tuple[App, TcpProxy]]:
    async with behind_a_proxy(settings, database_url) as replica:
        yield replica


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    return int(reply.status)


async def _health_becomes(channel: grpc.aio.Channel, status: int) -> bool:
    """Polls for up to 4 s (the health monitor pings every 0.5 s with a 1 s budget)."""
    for _ in range(40):
        if await _health(channel) == status:
            return True
        await asyncio.sleep(0.1)
    return await _health(channel) == status


async def _allowed_again(stub: Stub, secret: str) -> bool:
    """Polls for up to ~10 s until Authorize allows ``secret`` again (the service recovering by itself)."""
    for _ in range(100):
        try:
            if (await authorize(stub, secret)).allowed:
                return True
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    return (await authorize(stub, secret)).allowed


async def test_14_store_down_never_allows_and_answers_unavailable_within_envoys_timeout(
    proxied: tuple[App, TcpProxy],
) -> None:
    app, proxy = proxied
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        known = await create(stub, new_org())
        assert (await authorize(stub, known.secret)).allowed  # cached now
        unknown = KeyFormat("authsvc").generate().secret

        proxy.cut()
        # The cached key first: the hard case, before any uncached lookup has waited out its budget.
        for key in (known.secret, unknown) * 5:
            try:
                reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=0.2)
            except grpc.aio.AioRpcError as exc:
                # UNAVAILABLE, not DEADLINE_EXCEEDED: the answer came inside Envoy's 200 ms.
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert key not in (exc.details() or "")
            else:
                pytest.fail(f"answered {reply.reason} while the store was down")

        assert await _health_becomes(channel, health_pb2.HealthCheckResponse.NOT_SERVING)

        proxy.restore()
        assert await _allowed_again(stub, known.secret)  # recovered by itself
        assert await _health_becomes(channel, health_pb2.HealthCheckResponse.SERVING)


async def test_14_hung_database_every_call_answers_unavailable_in_bounded_time(
    proxied: tuple[App, TcpProxy],
) -> None:
    """A database that hangs (no resets, no answers) must not hang callers or keep health SERVING.

    Closed connections are the easy case. Here every byte to PostgreSQL is
    held, so a timed-out query's cancellation is never acknowledged: the
    pooled connections that were idle are the ones that would hang.
    """
    app, proxy = proxied
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        org = new_org()
        known = await create(stub, org)
        assert (await authorize(stub, known.secret)).allowed
        # Several idle pooled connections, as after any busy moment.
        await asyncio.gather(*(stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=ADMIN)) for _ in range(6)))

        proxy.freeze()
        try:
            key_id = known.key.id
            management = asyncio.gather(
                code_of(
                    stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="x", scopes=["read"]), timeout=15)
                ),
                code_of(stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=key_id, actor=ADMIN), timeout=15)),
                code_of(stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=ADMIN), timeout=15)),
                code_of(stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN), timeout=15)),
            )
            # An unknown key at once; the cached one once the listener's freshness bound (100 ms) has passed
            # (silence is not a closed connection: that bound is what limits it, see README).
            for key, after in ((KeyFormat("authsvc").generate().secret, 0.0), (known.secret, 1.2)):
                await asyncio.sleep(after)
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=0.2)
                assert denied.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await _health_becomes(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
            # Within the store's write budget (5 s) plus a bounded release: never the client's 15 s deadline.
            assert [code for code, _ in await management] == [grpc.StatusCode.UNAVAILABLE] * 4
        finally:
            proxy.thaw()

        assert await _allowed_again(stub, known.secret)  # recovered by itself, and nothing was revoked


async def test_14_hung_database_mid_transaction_answers_unavailable_in_bounded_time(
    proxied: tuple[App, TcpProxy], db: asyncpg.Connection
) -> None:
    """A call already inside its transaction when the database hangs: its ROLLBACK is never acknowledged either."""
    app, proxy = proxied
    org = new_org()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        await create(stub, org)
        # Another session holds the organization's create lock, so the next CreateKey waits inside its transaction.
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(hashtextextended('authsvc.org:' || $1, 0))", org)
            request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="blocked", scopes=["read"])
            call = asyncio.ensure_future(code_of(stub.CreateKey(request, timeout=15)))
            await asyncio.sleep(0.5)
            proxy.freeze()
            try:
                code, _ = await call
            finally:
                proxy.thaw()
        # The 5 s write budget, then at most 1 s for the ROLLBACK and 1 s to release: not the client's 15 s deadline.
        assert code == grpc.StatusCode.UNAVAILABLE
        assert await _allowed_again(stub, (await create(stub, org, name="after")).secret)
