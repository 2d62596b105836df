"""Issue 14: ListAuditEvents through a real channel to a server on the real PostgreSQL.

The server here has a named admin token, so every row must name it as the
caller; the rows are also read with SQL to check that what the API shows is
what is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.access import AdminToken
from authsvc.config import Secret, Settings
from authsvc.runtime import App
from tests.grpc.test_lifecycle import code_of, ts
from tests.support import ADMIN, MEMBER, OWNER, Stub, free_port, new_org

TOKEN = "audit-test-token-0123456789"
METADATA = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
async def audited(database_url: str) -> AsyncIterator[Stub]:
    settings = Settings(
        database_url=Secret(database_url),
        last_used_flush_seconds=0.2,
        admin_tokens=(AdminToken("ci-deployer", TOKEN),),
    )
    app = App(settings, database_url, listen=f"127.0.0.1:{free_port()}")
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield authsvc_pb2_grpc.KeyServiceStub(channel)
    finally:
        await app.stop(grace=1)


async def events(stub: Stub, org: str, **kw: object) -> pb.ListAuditEventsResponse:
    request = pb.ListAuditEventsRequest(org_id=org, actor=kw.pop("actor", OWNER), **kw)  # type: ignore[arg-type]
    return await stub.ListAuditEvents(request, metadata=METADATA, timeout=10)


async def test_every_management_call_appears_with_its_fields_and_caller(audited: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    m = METADATA
    created = await audited.CreateKey(
        pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]), metadata=m
    )
    key_id = created.key.id
    await audited.GetKey(pb.GetKeyRequest(org_id=org, actor=MEMBER, key_id=key_id), metadata=m)
    await audited.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER), metadata=m)
    await audited.UpdateKey(
        pb.UpdateKeyRequest(org_id=org, actor=ADMIN, key_id=key_id, name="ci2", update_mask=FieldMask(paths=["name"])),
        metadata=m,
    )
    rotated = await audited.RotateKey(
        pb.RotateKeyRequest(org_id=org, actor=ADMIN, key_id=key_id, grace_period=Duration(seconds=60), reason="r"),
        metadata=m,
    )
    await audited.RevokeKey(
        pb.RevokeKeyRequest(org_id=org, actor=OWNER, key_id=rotated.key.id, reason="leaked"), metadata=m
    )
    await audited.RevokeKeys(
        pb.RevokeKeysRequest(org_id=org, actor=OWNER, created_by="alice", reason="offboarding"), metadata=m
    )
    with pytest.raises(grpc.aio.AioRpcError):  # a refused call is on the trail too
        await audited.CreateKey(pb.CreateKeyRequest(org_id=org, actor=MEMBER, name="x", scopes=["read"]), metadata=m)

    listed = (await events(audited, org)).events
    expected = [
        ("key.create", "denied", "", "mike"),
        ("key.revoke_created_by", "ok", "", "olivia"),
        ("key.revoke", "ok", key_id, "olivia"),
        ("key.revoke", "ok", rotated.key.id, "olivia"),
        ("key.create", "ok", rotated.key.id, "alice"),
        ("key.rotate", "ok", key_id, "alice"),
        ("key.update", "ok", key_id, "alice"),
        ("key.list", "ok", "", "mike"),
        ("key.get", "ok", key_id, "mike"),
        ("key.create", "ok", key_id, "alice"),
    ]
    assert [(e.action, e.outcome, e.key_id, e.actor.user_id) for e in listed] == expected
    assert all(e.caller == "ci-deployer" and e.org_id == org for e in listed)
    assert listed[3].details["reason"] == "leaked" and listed[3].actor.role == pb.ROLE_OWNER
    assert listed[-1].details["name"] == "ci" and listed[-1].details["scopes"] == '["read"]'
    now = datetime.now(UTC)
    assert all(now - timedelta(minutes=1) < e.time.ToDatetime(UTC) <= now for e in listed)
    # What the API shows is what is stored, hash included.
    rows = await db.fetch("SELECT id, hash FROM audit_events WHERE org_id = $1 ORDER BY id DESC", org)
    assert [(e.id, e.hash) for e in listed] == [(r["id"], bytes(r["hash"])) for r in rows[1:]]  # rows[0]: the read
    assert rows[0]["id"] > listed[0].id
    # The read itself is audited, and shows on the next read.
    assert (await events(audited, org, page_size=1)).events[0].action == "audit.list"


async def test_pages_cover_the_trail_once_newest_first_and_filters_apply(audited: Stub) -> None:
    org = new_org()
    keys = []
    for i in range(5):
        created = await audited.CreateKey(
            pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=f"k{i}", scopes=["read"]), metadata=METADATA
        )
        keys.append(created.key.id)
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await events(audited, org, action="key.create", page_size=2, page_token=token)
        seen += [e.id for e in page.events]
        assert all(e.action == "key.create" for e in page.events)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == 5 and seen == sorted(seen, reverse=True)
    by_key = (await events(audited, org, key_id=keys[2])).events
    assert [(e.action, e.key_id) for e in by_key] == [("key.create", keys[2])]
    everything = (await events(audited, org, page_size=500)).events
    assert not (await events(audited, org, page_size=500)).next_page_token
    start, end = everything[-1].time, everything[-3].time  # the first, and the third, event
    window = (await events(audited, org, start_time=start, end_time=end)).events
    assert [e.id for e in window] == [everything[-2].id, everything[-1].id]  # start inclusive, end exclusive
    # + its own read, the second 500 read and the window read
    assert len((await events(audited, org)).events) == len(everything) + 3
    assert not (await events(audited, new_org())).events  # a new org: nothing (this read is written after)


async def test_page_size_defaults_to_50(audited: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    await db.executemany(
        "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, outcome) "
        "VALUES ($1, 'alice', 'admin', 'key.get', 'ok')",
        [(org,)] * 60,
    )
    page = await events(audited, org)
    assert len(page.events) == 50 and page.next_page_token
    assert len((await events(audited, org, page_token=page.next_page_token)).events) == 10


async def test_a_token_from_another_org_or_altered_is_invalid_argument(audited: Stub, db: asyncpg.Connection) -> None:
    mine, theirs = new_org(), new_org()
    for org in (mine, theirs):
        for _ in range(3):
            await audited.CreateKey(
                pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="k", scopes=["read"]), metadata=METADATA
            )
    token = (await events(audited, theirs, page_size=1)).next_page_token
    assert token
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    code, message = await code_of(events(audited, mine, page_size=1, page_token=token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in message
    code, message = await code_of(events(audited, theirs, page_token=token, action="key.create"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in message  # other filters
    altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in (altered, "not-a-token", token + "x", hashlib.sha256(b"x").hexdigest()):
        code, message = await code_of(events(audited, theirs, page_size=1, page_token=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in message, bad
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before  # nothing written


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"page_size": 501}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"key_id": "not-a-uuid"}, "key_id"),
        ({"action": "DROP TABLE"}, "action"),
        ({"org_id": ""}, "org_id"),
        (
            {
                "start_time": ts(datetime(2026, 1, 2, tzinfo=UTC)),
                "end_time": ts(datetime(2026, 1, 1, tzinfo=UTC)),
            },
            "end_time",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    audited: Stub, db: asyncpg.Connection, fields: dict[str, object], named: str
) -> None:
    org = new_org()
    request = pb.ListAuditEventsRequest(org_id=org, actor=OWNER)
    for name, value in fields.items():
        if isinstance(value, Timestamp):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await audited.ListAuditEvents(request, metadata=METADATA, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (info.value.details() or "")
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before


async def test_only_admins_and_owners_read_the_trail_and_a_token_is_needed(audited: Stub) -> None:
    org = new_org()
    code, message = await code_of(events(audited, org, actor=MEMBER))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "ROLE_ADMIN" in message
    code, _ = await code_of(audited.ListAuditEvents(pb.ListAuditEventsRequest(org_id=org, actor=OWNER), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert [(e.action, e.outcome) for e in (await events(audited, org, actor=ADMIN)).events] == [
        ("audit.list", "denied")
    ]


async def test_the_trail_is_readable_while_writes_go_on(audited: Stub) -> None:
    """Paging by position: events written while a client pages never repeat or shift a page."""
    org = new_org()
    for _ in range(4):
        await audited.CreateKey(
            pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="k", scopes=["read"]), metadata=METADATA
        )
    first = await events(audited, org, action="key.create", page_size=2)
    await asyncio.gather(
        *(
            audited.CreateKey(
                pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="n", scopes=["read"]), metadata=METADATA
            )
            for _ in range(3)
        )
    )
    second = await events(audited, org, action="key.create", page_size=2, page_token=first.next_page_token)
    assert {e.id for e in first.events}.isdisjoint(e.id for e in second.events)
    assert max(e.id for e in second.events) < min(e.id for e in first.events)
