"""Issue 4 correctness: cache invalidation, listener loss, rate limits. Timing goals live in bench/."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.config import Secret, Settings
from authsvc.core.keys import KeyGrant
from authsvc.runtime import App
from tests.grpc.test_lifecycle import authorize, create
from tests.replicas import running
from tests.support import ADMIN, Stub, free_port, new_org


async def until(predicate: Any, within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def kill_listener(app: App, db: asyncpg.Connection) -> int:
    """Terminate the listener's backend and wait until the replica has seen the loss; returns the old pid.

    A listener still reconnecting from an earlier kill has no backend yet:
    wait for it first (on a loaded machine that takes longer than a test's loop turn).
    """

    async def subscribed() -> bool:
        return app.feed.connected.is_set() and app.feed.backend_pid is not None

    await until(subscribed, within=10.0)
    old_pid = app.feed.backend_pid
    assert old_pid is not None
    await db.execute("SELECT pg_terminate_backend($1)", old_pid)

    async def loss_seen() -> bool:
        return not app.feed.connected.is_set() or app.feed.backend_pid != old_pid

    await until(loss_seen)
    return old_pid


async def test_revocation_on_one_replica_reaches_the_others_cache(
    stub: Stub, settings: Settings, database_url: str
) -> None:
    async with running(settings, database_url) as (_, replica):
        org = new_org()
        created = await create(stub, org)
        assert (await authorize(replica, created.secret)).allowed  # cached on the replica
        await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))

        async def denied() -> bool:
            return (await authorize(replica, created.secret)).reason == pb.REASON_REVOKED

        await until(denied)


async def test_a_zero_grace_rotation_on_one_replica_reaches_the_others_cache(
    stub: Stub, settings: Settings, database_url: str
) -> None:
    """Rotation shortens the old key's expiry: every replica's cached allow for it must go."""
    async with running(settings, database_url) as (_, replica):
        org = new_org()
        old = await create(stub, org)
        assert (await authorize(replica, old.secret)).allowed  # cached on the replica
        rotated = await stub.RotateKey(pb.RotateKeyRequest(org_id=org, key_id=old.key.id, actor=ADMIN))

        async def expired() -> bool:
            return (await authorize(replica, old.secret)).reason == pb.REASON_EXPIRED

        await until(expired)
        assert (await authorize(replica, rotated.secret)).allowed


async def test_a_label_update_on_one_replica_reaches_the_others_cache(
    stub: Stub, settings: Settings, database_url: str
) -> None:
    from google.protobuf.field_mask_pb2 import FieldMask

    async with running(settings, database_url) as (_, replica):
        org = new_org()
        created = await create(stub, org, labels={"tier": "free"})
        assert dict((await authorize(replica, created.secret)).principal.labels) == {"tier": "free"}  # cached
        await stub.UpdateKey(
            pb.UpdateKeyRequest(
                org_id=org,
                key_id=created.key.id,
                actor=ADMIN,
                name="renamed",
                labels={"tier": "gold"},
                update_mask=FieldMask(paths=["name", "labels"]),
            )
        )

        async def relabelled() -> bool:
            principal = (await authorize(replica, created.secret)).principal
            return principal.key_name == "renamed" and dict(principal.labels) == {"tier": "gold"}

        await until(relabelled)


async def test_a_bulk_revocation_on_one_replica_reaches_the_others_cache(
    stub: Stub, settings: Settings, database_url: str
) -> None:
    async with running(settings, database_url) as (_, replica):
        org = new_org()
        keys = [await create(stub, org) for _ in range(4)]
        for key in keys:
            assert (await authorize(replica, key.secret)).allowed  # cached on the replica
        await stub.RevokeKeys(pb.RevokeKeysRequest(org_id=org, actor=ADMIN, created_by=ADMIN.user_id))

        async def all_revoked() -> bool:
            answers = [await authorize(replica, key.secret) for key in keys]
            return all(a.reason == pb.REASON_REVOKED for a in answers)

        await until(all_revoked)


async def test_a_cached_unknown_key_is_evicted_when_the_key_is_created(
    app: App, settings: Settings, database_url: str
) -> None:
    """Negative entries are evicted by the create notification, on every replica."""
    from datetime import UTC, datetime

    from authsvc.core.keyformat import KeyFormat
    from authsvc.core.keys import Actor, Role
    from authsvc.core.ports import NewKey

    async with running(settings, database_url) as (_, replica):
        issued = KeyFormat("authsvc").generate()
        assert (await authorize(replica, issued.secret)).reason == pb.REASON_UNKNOWN_KEY  # cached as unknown
        # The same code path CreateKey uses, with a secret this test knows in advance.
        await app.store.create_key(
            NewKey(
                org_id=new_org(),
                name="late",
                prefix=issued.display_prefix,
                digest=issued.digest,
                scopes=("read",),
                created_by="alice",
                expire_time=None,
                rate_limit=0,
            ),
            Actor("alice", Role.ADMIN),
            10,
            datetime.now(UTC),
        )

        async def allowed() -> bool:
            return (await authorize(replica, issued.secret)).allowed

        await until(allowed)


async def test_listener_loss_never_serves_a_missed_revocation(
    stub: Stub, settings: Settings, database_url: str, db: asyncpg.Connection
) -> None:
    """Kill the listener's backend, revoke with no notification at all while it reconnects: still denied.

    Between the backend's death and the replica seeing its connection close
    there is a window of the same size as normal notification latency (the
    benchmark bounds it); from the moment the loss is seen, no cached
    decision is served until the listener has resubscribed from empty.
    """
    async with running(settings, database_url) as (replica_app, replica):
        for _ in range(10):
            org = new_org()
            created = await create(stub, org)
            assert (await authorize(replica, created.secret)).allowed  # cached on the replica
            old_pid = await kill_listener(replica_app, db)
            # A revocation the replica can never hear about: no NOTIFY.
            await db.execute(
                "UPDATE api_keys SET revoke_time = now(), revoked_by = 'dba' WHERE id = $1", uuid.UUID(created.key.id)
            )
            reply = await authorize(replica, created.secret)
            assert not reply.allowed
            assert reply.reason == pb.REASON_REVOKED

            async def resubscribed(old_pid: int = old_pid) -> bool:
                pid = replica_app.feed.backend_pid
                return replica_app.feed.connected.is_set() and pid is not None and pid != old_pid

            await until(resubscribed)
            assert (await authorize(replica, created.secret)).reason == pb.REASON_REVOKED


async def test_revoking_through_another_replica_while_the_listener_reconnects(
    stub: Stub, settings: Settings, database_url: str, db: asyncpg.Connection
) -> None:
    async with running(settings, database_url) as (replica_app, replica):
        for _ in range(10):
            org = new_org()
            created = await create(stub, org)
            assert (await authorize(replica, created.secret)).allowed
            await kill_listener(replica_app, db)
            await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
            assert (await authorize(replica, created.secret)).reason == pb.REASON_REVOKED


async def test_concurrent_misses_batched_together_each_get_their_own_answer(
    stub: Stub, settings: Settings, database_url: str
) -> None:
    """With the cache off every Authorize reads PostgreSQL; concurrent reads share queries, never answers."""
    from authsvc.core.keyformat import KeyFormat

    async with running(settings, database_url, cache_size=0) as (_, replica):
        org = new_org()
        readers = [(await create(stub, org, ("read",), name=f"r{i}")).secret for i in range(4)]
        writer = (await create(stub, org, ("write",), name="w")).secret
        revoked = await create(stub, org, ("read",), name="gone")
        await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=revoked.key.id, actor=ADMIN))
        unknown = [KeyFormat("authsvc").generate().secret for _ in range(4)]
        cases = (
            [(k, "write", pb.REASON_INSUFFICIENT_SCOPE) for k in readers]
            + [(k, "read", pb.REASON_OK) for k in readers]
            + [(writer, "write", pb.REASON_OK)] * 3
            + [(revoked.secret, "read", pb.REASON_REVOKED)] * 2
            + [(k, "read", pb.REASON_UNKNOWN_KEY) for k in unknown]
        ) * 3
        replies = await asyncio.gather(*(authorize(replica, key, scope) for key, scope, _ in cases))
        assert [r.reason for r in replies] == [reason for _, _, reason in cases]
        by_key = {r.principal.key_id for r in replies if r.reason == pb.REASON_OK}
        assert len(by_key) == 5  # four readers and the writer, each answered with its own principal


# Rate limits ---------------------------------------------------------------

WINDOW = 60


async def fresh_window(seconds: int = WINDOW) -> None:
    """Start a test at the beginning of a rate-limit window, so its requests cannot straddle two."""
    left = seconds - time.time() % seconds
    if left < 5:
        await asyncio.sleep(left + 0.01)


async def test_deployment_default_rate_limit_gives_429_with_counters(settings: Settings, database_url: str) -> None:
    async with running(settings, database_url, rate_limit=3, rate_limit_window_seconds=WINDOW) as (_, stub):
        created = await create(stub, new_org())
        await fresh_window()
        replies = [await authorize(stub, created.secret) for _ in range(4)]
        assert [r.http_status for r in replies] == [200, 200, 200, 429]
        assert [r.rate_limit.remaining for r in replies] == [2, 1, 0, 0]
        limited = replies[-1]
        assert (limited.allowed, limited.reason, limited.rate_limit.limit) == (False, pb.REASON_RATE_LIMITED, 3)
        assert 1 <= limited.rate_limit.reset_seconds <= 60
        assert limited.principal.key_id == created.key.id


async def test_per_key_limit_overrides_the_default(settings: Settings, database_url: str) -> None:
    async with running(settings, database_url, rate_limit=100, rate_limit_window_seconds=WINDOW) as (_, stub):
        created = await create(stub, new_org(), rate_limit=1)
        await fresh_window()
        assert created.key.rate_limit == 1
        assert (await authorize(stub, created.secret)).allowed
        assert (await authorize(stub, created.secret)).http_status == 429


async def test_unlimited_by_default_sets_no_rate_limit_fields(stub: Stub) -> None:
    created = await create(stub, new_org())
    reply = await authorize(stub, created.secret)
    assert reply.allowed and not reply.HasField("rate_limit")


async def test_denied_keys_do_not_spend_the_limit(settings: Settings, database_url: str) -> None:
    async with running(settings, database_url, rate_limit=1, rate_limit_window_seconds=WINDOW) as (_, stub):
        created = await create(stub, new_org(), ("read",))
        await fresh_window()
        for _ in range(3):
            assert (await authorize(stub, created.secret, "write")).http_status == 403
        assert (await authorize(stub, created.secret, "read")).http_status == 200


async def test_redis_shares_the_limit_across_replicas(settings: Settings, database_url: str, redis_url: str) -> None:
    shared = {"rate_limit": 4, "rate_limit_window_seconds": WINDOW, "redis_url": Secret(redis_url)}
    async with (
        running(settings, database_url, **shared) as (_, one),
        running(settings, database_url, **shared) as (_, two),
    ):
        created = await create(one, new_org())
        await fresh_window()
        statuses = [(await authorize(stub, created.secret)).http_status for _ in range(4) for stub in (one, two)]
        assert statuses.count(200) == 4
        assert statuses.count(429) == 4


async def test_redis_down_keeps_keys_working_on_local_limits(settings: Settings, database_url: str) -> None:
    dead = Secret(f"redis://127.0.0.1:{free_port()}/0")
    async with running(settings, database_url, rate_limit=2, rate_limit_window_seconds=WINDOW, redis_url=dead) as (
        app,
        stub,
    ):
        created = await create(stub, new_org())
        await fresh_window()
        replies = [await authorize(stub, created.secret) for _ in range(3)]
        assert [r.http_status for r in replies] == [200, 200, 429]  # the local fallback still limits
        # Redis is asked once; its failure opens the circuit breaker and the rest count locally at once.
        assert app.limiter.shared_failures >= 1 and app.limiter.breaker_open


@pytest.mark.parametrize("limit", [0, 5])
async def test_rate_limit_field_is_echoed_on_the_key(stub: Stub, limit: int) -> None:
    created = await create(stub, new_org(), rate_limit=limit)
    assert created.key.rate_limit == limit


async def test_rows_read_from_the_listeners_own_server_are_cached(app: App, stub: Stub) -> None:
    """The pool and the listener identify the same server, so lookups do get cached (the feed check is no veto)."""
    from authsvc.core.keyformat import digest

    cache = app.authorizer.cache
    assert cache is not None
    created = await create(stub, new_org())
    for _ in range(20):  # a notification landing mid-lookup legitimately refuses one put; try again
        assert (await authorize(stub, created.secret)).allowed
        if isinstance(cache.get(digest(created.secret)), KeyGrant):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a key read from the primary was never cached")
