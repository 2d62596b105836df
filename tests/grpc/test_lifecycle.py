"""The core issue's semantics, through a real gRPC channel to a running server on a real PostgreSQL.

Numbers in test names refer to the semantics list of the core issue.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support import ADMIN, MEMBER, OWNER, Stub, new_org


def ts(dt: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(dt)
    return out


async def create(stub: Stub, org: str, scopes: tuple[str, ...] = ("read",), **kw: object) -> pb.CreateKeyResponse:
    request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=kw.pop("name", "ci"), scopes=scopes, **kw)  # type: ignore[arg-type]
    return await stub.CreateKey(request)


async def authorize(stub: Stub, key: str, scope: str = "") -> pb.AuthorizeResponse:
    return await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope=scope))


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


# 1. Key format -------------------------------------------------------------


async def test_1_secret_has_the_deployment_format_and_prefix_is_its_first_12_characters(stub: Stub) -> None:
    created = await create(stub, new_org())
    assert re.fullmatch(r"authsvc_[0-9A-Za-z]{49}", created.secret)
    assert created.key.prefix == created.secret[:12]


async def test_1_a_typo_is_malformed_not_unknown(stub: Stub) -> None:
    secret = (await create(stub, new_org())).secret
    typo = secret[:20] + ("A" if secret[20] != "A" else "B") + secret[21:]
    reply = await authorize(stub, typo)
    assert (reply.reason, reply.http_status) == (pb.REASON_MALFORMED_KEY, 401)


# 2. Only the SHA-256 is stored; the secret is shown once -----------------


async def test_2_secret_is_returned_by_create_only(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    got = await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    listed = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))
    revoked = await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
    for message in (got, listed, revoked):
        assert created.secret not in str(message)
        assert created.secret[12:] not in message.SerializeToString().decode("latin-1")


# 3. Organization from the key alone ---------------------------------------


async def test_3_authorize_resolves_the_organization_from_the_key(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    reply = await authorize(stub, created.secret)
    assert reply.allowed
    assert reply.principal.org_id == org
    assert reply.principal.user_id == ADMIN.user_id
    assert reply.principal.key_id == created.key.id


# 4. Scopes ----------------------------------------------------------------


async def test_4_write_implies_read_and_effective_scopes_are_expanded(stub: Stub) -> None:
    created = await create(stub, new_org(), ("write",))
    reply = await authorize(stub, created.secret, "read")
    assert reply.allowed
    assert list(reply.principal.scopes) == ["read", "write"]
    assert list(created.key.scopes) == ["write"]  # what was granted is what is listed


async def test_4_reserved_scope_can_be_granted(stub: Stub) -> None:
    created = await create(stub, new_org(), ("delete",))
    assert (await authorize(stub, created.secret, "delete")).allowed


async def test_4_unknown_scope_is_invalid_and_named(stub: Stub) -> None:
    code, message = await code_of(create(stub, new_org(), ("read", "admin")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'admin'" in message and "read" in message


async def test_4_at_least_one_scope_is_required(stub: Stub) -> None:
    code, message = await code_of(create(stub, new_org(), ()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one scope" in message


async def test_4_scopes_cannot_change_even_in_the_database(stub: Stub, db: asyncpg.Connection) -> None:
    created = await create(stub, new_org(), ("read",))
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await db.execute("UPDATE api_keys SET scopes = '{write}' WHERE id = $1", uuid.UUID(created.key.id))


# 5. Roles -----------------------------------------------------------------


@pytest.mark.parametrize("role", [pb.ROLE_MEMBER, pb.ROLE_UNSPECIFIED])
async def test_5_only_admins_and_owners_create(stub: Stub, role: int) -> None:
    request = pb.CreateKeyRequest(org_id=new_org(), actor=pb.Actor(user_id="u", role=role), name="n", scopes=["read"])  # type: ignore[arg-type]
    code, _ = await code_of(stub.CreateKey(request))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_5_only_admins_and_owners_revoke(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    code, _ = await code_of(stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    revoked = await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=OWNER))
    assert revoked.key.state == pb.KEY_STATE_REVOKED


async def test_5_members_get_and_list_but_unspecified_role_cannot(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    assert (
        await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    ).key.id == created.key.id
    assert (await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))).total == 1
    nobody = pb.Actor(user_id="u")
    code, _ = await code_of(stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=nobody)))
    assert code == grpc.StatusCode.PERMISSION_DENIED


# 6. At most 10 active keys --------------------------------------------------


async def test_6_eleventh_active_key_is_refused_until_one_is_revoked(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    keys = [await create(stub, org, name=f"k{i}") for i in range(10)]
    code, message = await code_of(create(stub, org))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "revoke unused keys" in message
    refused = await db.fetchval(
        "SELECT count(*) FROM audit_events WHERE org_id = $1 AND action = 'key.create' AND outcome = 'limit_reached'",
        org,
    )
    assert refused == 1  # the refusal is on the audit trail too
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=keys[0].key.id, actor=ADMIN))
    assert (await create(stub, org)).secret


async def test_6_expired_keys_do_not_count(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    for i in range(10):
        await create(stub, org, name=f"k{i}")
    await db.execute("UPDATE api_keys SET expire_time = now() - interval '1 second' WHERE org_id = $1", org)
    assert (await create(stub, org)).secret


async def test_6_concurrent_creates_never_exceed_the_limit(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    results = await asyncio.gather(*(create(stub, org, name=f"k{i}") for i in range(40)), return_exceptions=True)
    created = [r for r in results if isinstance(r, pb.CreateKeyResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 10
    assert len(refused) == 30
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 10


# 7. Expiry ----------------------------------------------------------------


async def test_7_expire_time_in_the_past_is_invalid(stub: Stub) -> None:
    code, message = await code_of(create(stub, new_org(), expire_time=ts(datetime.now(UTC) - timedelta(minutes=1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expire_time" in message


async def test_7_expired_key_is_denied_with_expired(stub: Stub) -> None:
    """Expiry is checked on every cache hit: no notification tells the cache a key expired."""
    org = new_org()
    expires = datetime.now(UTC) + timedelta(seconds=2)
    created = await create(stub, org, expire_time=ts(expires))
    reply = await authorize(stub, created.secret)
    assert reply.allowed or datetime.now(UTC) >= expires  # cached while valid (unless the machine is very slow)
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    reply = await authorize(stub, created.secret)
    assert (reply.reason, reply.http_status, reply.allowed) == (pb.REASON_EXPIRED, 401, False)
    assert reply.principal.key_id == created.key.id
    got = await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    assert got.key.state == pb.KEY_STATE_EXPIRED


# 8. Revocation ----------------------------------------------------------


async def test_8_revocation_is_immediate_and_idempotent(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    assert (await authorize(stub, created.secret)).allowed  # now cached
    first = await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason="leaked"))
    reply = await authorize(stub, created.secret)
    assert (reply.reason, reply.http_status) == (pb.REASON_REVOKED, 401)
    again = await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=OWNER, reason="twice"))
    assert again.key.revoke_time == first.key.revoke_time
    assert (again.key.revoked_by, again.key.revoke_reason) == (ADMIN.user_id, "leaked")


async def until_last_used(db: asyncpg.Connection, key_id: str) -> datetime:
    """Poll until the batched last_used_time has been written (the test server flushes every 0.2 s)."""
    deadline = asyncio.get_running_loop().time() + 3
    while True:
        stored: datetime | None = await db.fetchval(
            "SELECT last_used_time FROM api_keys WHERE id = $1", uuid.UUID(key_id)
        )
        if stored is not None:
            return stored
        assert asyncio.get_running_loop().time() < deadline, "last_used_time was never written"
        await asyncio.sleep(0.05)


async def test_8_revoked_keys_stay_listed_with_last_use_and_revoker(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    await authorize(stub, created.secret)
    await until_last_used(db, created.key.id)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason="rotated"))
    listed = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER, state=pb.KEY_STATE_REVOKED))
    assert [k.id for k in listed.data] == [created.key.id]
    assert listed.data[0].revoked_by == ADMIN.user_id
    assert listed.data[0].HasField("last_used_time")


async def test_8_a_revocation_cannot_be_undone_even_in_the_database(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
    with pytest.raises(asyncpg.RaiseError, match="un-revoked"):
        await db.execute("UPDATE api_keys SET revoke_time = NULL WHERE id = $1", uuid.UUID(created.key.id))


# 9. Authorize outcomes ----------------------------------------------------


async def test_9_outcome_table(stub: Stub) -> None:
    org = new_org()
    reader = await create(stub, org, ("read",))
    revoked = await create(stub, org, ("read",))
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=revoked.key.id, actor=ADMIN))
    from authsvc.core.keyformat import KeyFormat

    unknown = KeyFormat("authsvc").generate().secret
    cases = [
        ("", "read", pb.REASON_MISSING_KEY, 401),
        ("not-a-key", "read", pb.REASON_MALFORMED_KEY, 401),
        (unknown, "read", pb.REASON_UNKNOWN_KEY, 401),
        (revoked.secret, "read", pb.REASON_REVOKED, 401),
        (reader.secret, "write", pb.REASON_INSUFFICIENT_SCOPE, 403),
        (reader.secret, "read", pb.REASON_OK, 200),
        (reader.secret, "", pb.REASON_OK, 200),
    ]
    for key, scope, reason, status in cases:
        reply = await authorize(stub, key, scope)
        assert (reply.reason, reply.http_status, reply.allowed) == (reason, status, status == 200), (key[:12], scope)
        assert reply.message and (not key or key not in reply.message)


async def test_9_unknown_required_scope_is_invalid_argument(stub: Stub) -> None:
    created = await create(stub, new_org())
    code, message = await code_of(authorize(stub, created.secret, "admin"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "required_scope" in message and created.secret not in message


# 10. last_used_time, batched --------------------------------------------


async def test_10_last_used_time_is_recorded_after_the_flush(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    before = datetime.now(UTC)
    for _ in range(20):
        await authorize(stub, created.secret)
    stored = await until_last_used(db, created.key.id)
    assert stored >= before - timedelta(seconds=1)
    got = await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    assert got.key.last_used_time.ToDatetime(tzinfo=UTC) == stored


# 11. Audit rows -----------------------------------------------------------


async def test_11_every_management_call_leaves_an_audit_row(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=OWNER, reason="rotation"))
    await code_of(stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=MEMBER, name="x", scopes=["read"])))
    rows = await db.fetch(
        "SELECT action, actor_user_id, actor_role, outcome, key_id, detail, occurred_at FROM audit_events "
        "WHERE org_id = $1 ORDER BY id",
        org,
    )
    assert [(r["action"], r["actor_user_id"], r["outcome"]) for r in rows] == [
        ("key.create", "alice", "ok"),
        ("key.get", "mike", "ok"),
        ("key.list", "mike", "ok"),
        ("key.revoke", "olivia", "ok"),
        ("key.create", "mike", "denied"),
    ]
    assert '"rotation"' in rows[3]["detail"]
    assert all(r["occurred_at"] is not None for r in rows)


async def test_11_audit_names_the_key_asked_for_even_when_there_is_none(stub: Stub, db: asyncpg.Connection) -> None:
    """A probe for another organization's key id leaves that id in the prober's audit trail."""
    org, other = new_org(), new_org()
    theirs = await create(stub, other)
    await code_of(stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=theirs.key.id, actor=MEMBER)))
    await code_of(stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=theirs.key.id, actor=OWNER)))
    await code_of(stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=theirs.key.id, actor=MEMBER)))
    nobody = pb.Actor(user_id="nobody")  # no role: refused before the store is asked
    await code_of(stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=theirs.key.id, actor=nobody)))
    rows = await db.fetch("SELECT action, outcome, key_id FROM audit_events WHERE org_id = $1 ORDER BY id", org)
    assert [(r["action"], r["outcome"], str(r["key_id"])) for r in rows] == [
        ("key.get", "not_found", theirs.key.id),
        ("key.revoke", "not_found", theirs.key.id),
        ("key.revoke", "denied", theirs.key.id),
        ("key.get", "denied", theirs.key.id),
    ]


# 12. Cross-organization ---------------------------------------------------


async def test_12_another_orgs_key_is_not_found_exactly_like_a_missing_one(stub: Stub) -> None:
    created = await create(stub, new_org())
    intruder = new_org()
    missing = str(uuid.uuid4())
    for key_id in (created.key.id, missing):
        code, message = await code_of(stub.GetKey(pb.GetKeyRequest(org_id=intruder, key_id=key_id, actor=ADMIN)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert message == f"no key {key_id} in organization {intruder}"
        code, _ = await code_of(stub.RevokeKey(pb.RevokeKeyRequest(org_id=intruder, key_id=key_id, actor=ADMIN)))
        assert code == grpc.StatusCode.NOT_FOUND
    assert (await authorize(stub, created.secret)).allowed  # untouched by the attempt


# ListKeys paging ------------------------------------------------------------


async def test_list_keys_pages_newest_first_with_total_and_state_filter(stub: Stub) -> None:
    org = new_org()
    ids = [(await create(stub, org, name=f"k{i}")).key.id for i in range(5)]
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=ids[0], actor=ADMIN))
    first = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER, page=1, limit=2))
    second = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER, page=2, limit=2))
    third = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER, page=3, limit=2))
    assert [k.id for page in (first, second, third) for k in page.data] == ids[::-1]
    assert (first.total, first.page, first.limit) == (5, 1, 2)
    default = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))
    assert (default.page, default.limit) == (1, 20)
    active = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER, state=pb.KEY_STATE_ACTIVE))
    assert active.total == 4 and ids[0] not in [k.id for k in active.data]


async def test_9_swapped_key_and_scope_never_echo_the_key(stub: Stub) -> None:
    """A caller bug (arguments swapped) gets INVALID_ARGUMENT without its key or a huge value echoed back."""
    created = await create(stub, new_org())
    code, message = await code_of(authorize(stub, "read", created.secret))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert created.secret not in message and created.secret[12:] not in message
    code, message = await code_of(authorize(stub, created.secret, "x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) < 200 and "100000 characters" in message
