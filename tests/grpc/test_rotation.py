"""Issue 13: RotateKey with a grace period and RevokeKeys (offboarding), through a real channel on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.duration_pb2 import Duration

from authsvc.config import Settings
from tests.grpc.test_lifecycle import authorize, code_of, create, ts
from tests.support import ADMIN, MEMBER, OWNER, Stub, new_org

BOB = pb.Actor(user_id="bob", role=pb.ROLE_ADMIN)


def grace(seconds: float) -> Duration:
    out = Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


async def rotate(
    stub: Stub, org: str, key_id: str, seconds: float = 3600, actor: pb.Actor = BOB, **kw: object
) -> pb.RotateKeyResponse:
    request = pb.RotateKeyRequest(org_id=org, key_id=key_id, actor=actor, grace_period=grace(seconds), **kw)  # type: ignore[arg-type]
    return await stub.RotateKey(request)


async def rows(db: asyncpg.Connection, org: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org))


# -- RotateKey -------------------------------------------------------------------


async def test_13_rotation_copies_name_scopes_labels_rate_limit_and_expiry_and_is_created_by_the_actor(
    stub: Stub,
) -> None:
    org = new_org()
    expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    old = await create(
        stub, org, ("write",), name="billing", rate_limit=7, labels={"tier": "gold"}, expire_time=ts(expire)
    )
    rotated = await rotate(stub, org, old.key.id, reason="yearly")
    new = rotated.key
    assert (new.name, list(new.scopes), dict(new.labels), new.rate_limit) == ("billing", ["write"], {"tier": "gold"}, 7)
    assert new.expire_time.ToDatetime(tzinfo=UTC) == expire
    assert new.created_by == BOB.user_id and new.id != old.key.id and new.prefix == rotated.secret[:12]
    assert new.rotated_from == old.key.id and not new.rotated_to
    assert rotated.previous.id == old.key.id and rotated.previous.rotated_to == new.id
    reply = await authorize(stub, rotated.secret, "write")
    assert reply.allowed and reply.principal.user_id == "bob" and dict(reply.principal.labels) == {"tier": "gold"}


async def test_13_rotation_may_set_the_new_keys_expiry(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=90)
    rotated = await rotate(stub, org, old.key.id, expire_time=ts(expire))
    assert rotated.key.expire_time.ToDatetime(tzinfo=UTC) == expire
    chained = await rotate(stub, org, rotated.key.id)  # the successor can be rotated in turn, keeping that expiry
    assert chained.key.expire_time.ToDatetime(tzinfo=UTC) == expire and chained.key.rotated_from == rotated.key.id


async def test_13_the_old_key_works_during_its_grace_period_then_is_expired(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    assert (await authorize(stub, old.secret)).allowed  # cached in this process
    rotated = await rotate(stub, org, old.key.id, seconds=1.5)
    assert rotated.previous.state == pb.KEY_STATE_ACTIVE
    until = rotated.previous.expire_time.ToDatetime(tzinfo=UTC)
    assert timedelta(0) < until - datetime.now(UTC) <= timedelta(seconds=1.5)
    assert (await authorize(stub, old.secret)).allowed
    assert (await authorize(stub, rotated.secret)).allowed
    await asyncio.sleep(max((until - datetime.now(UTC)).total_seconds(), 0) + 0.05)
    reply = await authorize(stub, old.secret)
    assert (reply.reason, reply.http_status) == (pb.REASON_EXPIRED, 401)
    assert (await authorize(stub, rotated.secret)).allowed


async def test_13_zero_grace_stops_the_old_key_at_once(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    assert (await authorize(stub, old.secret)).allowed  # cached: the rotation must evict it
    rotated = await rotate(stub, org, old.key.id, seconds=0)
    assert rotated.previous.state == pb.KEY_STATE_EXPIRED
    assert (await authorize(stub, old.secret)).reason == pb.REASON_EXPIRED
    assert (await authorize(stub, rotated.secret)).allowed


async def test_13_unset_grace_period_means_zero(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    rotated = await stub.RotateKey(pb.RotateKeyRequest(org_id=org, key_id=old.key.id, actor=ADMIN))
    assert (await authorize(stub, old.secret)).reason == pb.REASON_EXPIRED
    assert rotated.previous.state == pb.KEY_STATE_EXPIRED


async def test_13_the_old_key_ends_at_the_earlier_of_its_grace_and_its_own_expiry(stub: Stub) -> None:
    org = new_org()
    own = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    old = await create(stub, org, expire_time=ts(own))
    rotated = await rotate(stub, org, old.key.id, seconds=86_400)
    assert rotated.previous.expire_time.ToDatetime(tzinfo=UTC) == own


async def test_13_rotation_at_the_key_limit_needs_no_free_slot(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    keys = [await create(stub, org) for _ in range(10)]
    rotated = await rotate(stub, org, keys[0].key.id)
    assert (await authorize(stub, keys[0].secret)).allowed and (await authorize(stub, rotated.secret)).allowed
    code, message = await code_of(create(stub, org))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert await rows(db, org) == 11  # 10 holding a slot, 1 in its grace period


async def test_13_concurrent_rotations_and_creates_at_the_limit_never_exceed_it(
    stub: Stub, db: asyncpg.Connection
) -> None:
    """At 9 of 10, 10 creates race 9 rotations through the real channel: exactly one create wins, every rotation does.

    Afterwards the org has exactly 10 active keys outside a grace period,
    read straight from the database.
    """
    org = new_org()
    keys = [await create(stub, org) for _ in range(9)]

    async def attempt_create() -> grpc.StatusCode:
        try:
            await create(stub, org)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def attempt_rotate(key_id: str) -> grpc.StatusCode:
        try:
            await rotate(stub, org, key_id)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    results = await asyncio.wait_for(
        asyncio.gather(*(attempt_create() for _ in range(10)), *(attempt_rotate(k.key.id) for k in keys)), 30
    )
    creates, rotations = results[:10], results[10:]
    assert creates.count(grpc.StatusCode.OK) == 1
    assert set(creates) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert rotations == [grpc.StatusCode.OK] * 9
    counted = await db.fetchval(
        "SELECT count(*) FROM api_keys WHERE org_id = $1 AND revoke_time IS NULL "
        "AND (expire_time IS NULL OR expire_time > now()) AND rotated_to IS NULL",
        org,
    )
    in_grace = await db.fetchval(
        "SELECT count(*) FROM api_keys WHERE org_id = $1 AND rotated_to IS NOT NULL AND expire_time > now()", org
    )
    assert (counted, in_grace) == (10, 9)


async def test_13_a_key_can_be_rotated_once_concurrent_rotations_of_it_agree(
    stub: Stub, db: asyncpg.Connection
) -> None:
    org = new_org()
    old = await create(stub, org)

    async def attempt() -> grpc.StatusCode:
        try:
            await rotate(stub, org, old.key.id)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    results = await asyncio.wait_for(asyncio.gather(*(attempt() for _ in range(5))), 30)
    assert sorted(results, key=str) == sorted([grpc.StatusCode.OK] + [grpc.StatusCode.FAILED_PRECONDITION] * 4, key=str)
    assert await rows(db, org) == 2


async def test_13_rotating_a_revoked_expired_or_rotated_key_is_failed_precondition(
    stub: Stub, db: asyncpg.Connection
) -> None:
    org = new_org()
    revoked = await create(stub, org)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=revoked.key.id, actor=ADMIN))
    expiring = await create(stub, org, expire_time=ts(datetime.now(UTC) + timedelta(hours=1)))
    # Expired without waiting for it (CreateKey refuses a past expiry).
    await db.execute(
        "UPDATE api_keys SET expire_time = now() - interval '1 second' WHERE id = $1", uuid.UUID(expiring.key.id)
    )
    rotated = await create(stub, org)
    await rotate(stub, org, rotated.key.id)
    for key_id, why in ((revoked.key.id, "revoked"), (expiring.key.id, "expired"), (rotated.key.id, "already rotated")):
        code, message = await code_of(rotate(stub, org, key_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and why in message, (why, message)


async def test_13_only_admins_and_owners_rotate(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    code, _ = await code_of(rotate(stub, org, old.key.id, actor=MEMBER))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (await rotate(stub, org, old.key.id, actor=OWNER)).key.created_by == OWNER.user_id


async def test_13_another_orgs_key_cannot_be_rotated(stub: Stub) -> None:
    old = await create(stub, new_org())
    code, _ = await code_of(rotate(stub, new_org(), old.key.id))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_13_revoking_the_old_key_ends_its_grace_at_once(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    rotated = await rotate(stub, org, old.key.id, seconds=86_400)
    assert (await authorize(stub, old.secret)).allowed
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=old.key.id, actor=ADMIN, reason="no longer used"))
    assert (await authorize(stub, old.secret)).reason == pb.REASON_REVOKED
    assert (await authorize(stub, rotated.secret)).allowed


@pytest.mark.parametrize(
    ("seconds", "message"),
    [(-1, "grace_period must not be negative"), (7 * 86_400 + 1, "grace_period must be at most 604800s")],
)
async def test_13_bad_grace_period_is_invalid_argument_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection, seconds: int, message: str
) -> None:
    org = new_org()
    old = await create(stub, org)
    code, details = await code_of(rotate(stub, org, old.key.id, seconds=seconds))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert await rows(db, org) == 1
    assert await db.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org) == 1  # the create only
    assert (await authorize(stub, old.secret)).allowed


async def test_13_a_grace_period_with_mixed_signs_is_invalid_argument(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    request = pb.RotateKeyRequest(
        org_id=org, key_id=old.key.id, actor=ADMIN, grace_period=Duration(seconds=5, nanos=-1)
    )
    code, details = await code_of(stub.RotateKey(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "grace_period is not a valid duration" in details


async def test_13_the_longest_grace_period_is_configurable(settings: Settings, database_url: str) -> None:
    """``AUTHSVC_MAX_ROTATION_GRACE`` (here 60 s) bounds grace_period instead of the 7-day default."""
    from tests.replicas import running

    async with running(settings, database_url, max_rotation_grace_seconds=60) as (_, replica):
        org = new_org()
        old = await create(replica, org)
        code, details = await code_of(rotate(replica, org, old.key.id, seconds=61))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 60s (AUTHSVC_MAX_ROTATION_GRACE)" in details
        assert (await rotate(replica, org, old.key.id, seconds=60)).previous.rotated_to


async def test_13_seven_days_of_grace_is_allowed(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    rotated = await rotate(stub, org, old.key.id, seconds=7 * 86_400)
    assert rotated.previous.expire_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(days=6, hours=23)


async def test_13_rotation_refuses_a_pasted_key_in_its_reason_and_a_past_expiry(
    stub: Stub, db: asyncpg.Connection
) -> None:
    org = new_org()
    old = await create(stub, org)
    code, details = await code_of(rotate(stub, org, old.key.id, reason=f"leaked {old.secret}"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason holds an API key" in details
    assert old.secret not in details
    code, details = await code_of(rotate(stub, org, old.key.id, expire_time=ts(datetime.now(UTC) - timedelta(hours=1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expire_time" in details
    assert await rows(db, org) == 1


async def test_13_list_keys_shows_rotated_to_and_rotated_from(stub: Stub) -> None:
    org = new_org()
    old = await create(stub, org)
    rotated = await rotate(stub, org, old.key.id)
    listed = {k.id: k for k in (await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))).data}
    assert listed[old.key.id].rotated_to == rotated.key.id and not listed[old.key.id].rotated_from
    assert listed[rotated.key.id].rotated_from == old.key.id and not listed[rotated.key.id].rotated_to
    got = await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=old.key.id, actor=MEMBER))
    assert got.key.rotated_to == rotated.key.id


async def test_13_rotation_is_audited_and_never_shows_the_secret(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    old = await create(stub, org)
    rotated = await rotate(stub, org, old.key.id, reason="yearly")
    await code_of(rotate(stub, org, old.key.id))  # already rotated: audited as refused
    audit = await db.fetch(
        "SELECT action, key_id, outcome, detail::text AS detail FROM audit_events WHERE org_id = $1 ORDER BY id", org
    )
    assert [(r["action"], str(r["key_id"]), r["outcome"]) for r in audit] == [
        ("key.create", old.key.id, "ok"),
        ("key.rotate", old.key.id, "ok"),
        ("key.create", rotated.key.id, "ok"),
        ("key.rotate", old.key.id, "failed_precondition"),
    ]
    assert "yearly" in audit[1]["detail"] and rotated.key.id in audit[1]["detail"]
    assert all(rotated.secret not in r["detail"] and rotated.secret[12:] not in r["detail"] for r in audit)


async def test_13_a_rotated_key_stays_rotated_even_in_the_database(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    old = await create(stub, org)
    await rotate(stub, org, old.key.id)
    with pytest.raises(asyncpg.RaiseError, match="rotation cannot be changed"):
        await db.execute("UPDATE api_keys SET rotated_to = NULL WHERE id = $1", uuid.UUID(old.key.id))
    with pytest.raises(asyncpg.RaiseError, match="cannot be extended"):
        await db.execute(
            "UPDATE api_keys SET expire_time = expire_time + interval '1 day' WHERE id = $1", uuid.UUID(old.key.id)
        )


# -- RevokeKeys (offboarding) ---------------------------------------------------------


async def test_13_revoke_keys_revokes_every_active_key_of_one_user_and_nothing_else(
    stub: Stub, db: asyncpg.Connection
) -> None:
    org, other_org = new_org(), new_org()
    alices = [await create(stub, org) for _ in range(3)]
    in_grace = await create(stub, org)
    await rotate(stub, org, in_grace.key.id, actor=ADMIN)  # the successor is alice's too; the old key is in grace
    already = await create(stub, org)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=already.key.id, actor=ADMIN))
    bobs = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=BOB, name="bob's", scopes=["read"]))
    elsewhere = await create(stub, other_org)
    for key in (*alices, in_grace):
        assert (await authorize(stub, key.secret)).allowed  # cached: each must be evicted

    reply = await stub.RevokeKeys(
        pb.RevokeKeysRequest(org_id=org, actor=OWNER, created_by="alice", reason="left the company")
    )
    revoked_ids = {k.id for k in reply.keys}
    assert len(revoked_ids) == 5 and {k.key.id for k in (*alices, in_grace)} <= revoked_ids
    assert already.key.id not in revoked_ids
    assert all(
        k.state == pb.KEY_STATE_REVOKED and k.revoked_by == "olivia" and k.revoke_reason == "left the company"
        for k in reply.keys
    )
    for key in (*alices, in_grace):
        assert (await authorize(stub, key.secret)).reason == pb.REASON_REVOKED
    assert (await authorize(stub, bobs.secret)).allowed
    assert (await authorize(stub, elsewhere.secret)).allowed
    audit = await db.fetch(
        "SELECT action, key_id FROM audit_events WHERE org_id = $1 AND actor_user_id = 'olivia' ORDER BY id", org
    )
    assert sorted(str(r["key_id"]) for r in audit if r["action"] == "key.revoke") == sorted(revoked_ids)
    assert [r["action"] for r in audit][-1] == "key.revoke_created_by"


async def test_13_revoke_keys_is_idempotent(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    await create(stub, org)
    request = pb.RevokeKeysRequest(org_id=org, actor=ADMIN, created_by="alice", reason="offboarding")
    assert len((await stub.RevokeKeys(request)).keys) == 1
    assert len((await stub.RevokeKeys(request)).keys) == 0
    calls = await db.fetchval(
        "SELECT count(*) FROM audit_events WHERE org_id = $1 AND action = 'key.revoke_created_by'", org
    )
    assert calls == 2


async def test_13_revoke_keys_needs_created_by_and_an_admin(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    key = await create(stub, org)
    code, message = await code_of(stub.RevokeKeys(pb.RevokeKeysRequest(org_id=org, actor=ADMIN, created_by="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "created_by is required" in message
    code, _ = await code_of(stub.RevokeKeys(pb.RevokeKeysRequest(org_id=org, actor=MEMBER, created_by="alice")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, message = await code_of(
        stub.RevokeKeys(pb.RevokeKeysRequest(org_id=org, actor=ADMIN, created_by="alice", reason=key.secret))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and key.secret not in message
    assert (await authorize(stub, key.secret)).allowed
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1 AND revoke_time IS NOT NULL", org) == 0
