"""Issue 14: GetKeyUsage through a real channel to a server on the real PostgreSQL (flush every 0.2 s)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.core.keyformat import digest
from authsvc.runtime import App
from tests.grpc.test_lifecycle import authorize, code_of, create
from tests.observability.test_metrics import scrape, value
from tests.support import ADMIN, MEMBER, Stub, new_org


async def usage(stub: Stub, org: str, key_id: str, **kw: object) -> pb.GetKeyUsageResponse:
    request = pb.GetKeyUsageRequest(org_id=org, key_id=key_id, actor=kw.pop("actor", MEMBER), **kw)  # type: ignore[arg-type]
    return await stub.GetKeyUsage(request, timeout=10)


async def counted(stub: Stub, org: str, key_id: str, expected: tuple[int, int, int]) -> pb.GetKeyUsageResponse:
    """Counts lag by at most the flush interval (0.2 s here): wait a bounded time for them."""
    for _ in range(50):
        answer = await usage(stub, org, key_id)
        today = answer.days[-1]
        if (today.allowed, today.denied, today.rate_limited) == expected:
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(f"today's counts {today} never reached {expected}")


async def test_every_answer_is_counted_for_today_and_the_other_days_are_zeros(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org, rate_limit=2)
    answers = [await authorize(stub, created.secret, "read") for _ in range(4)]
    answers += [await authorize(stub, created.secret, "write") for _ in range(3)]
    assert [a.reason for a in answers] == [pb.REASON_OK] * 2 + [pb.REASON_RATE_LIMITED] * 2 + [
        pb.REASON_INSUFFICIENT_SCOPE
    ] * 3
    answer = await counted(stub, org, created.key.id, (2, 3, 2))
    today = datetime.now(UTC).date()
    assert [d.date for d in answer.days] == [(today - timedelta(days=29 - i)).isoformat() for i in range(30)]
    assert all((d.allowed, d.denied, d.rate_limited) == (0, 0, 0) for d in answer.days[:-1])
    assert answer.last_used_time.ToDatetime(UTC) > datetime.now(UTC) - timedelta(minutes=1)
    assert len((await usage(stub, org, created.key.id, days=90)).days) == 90
    assert len((await usage(stub, org, created.key.id, days=1)).days) == 1


async def test_a_revoked_key_keeps_its_history_and_a_new_key_has_none(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    assert (await authorize(stub, created.secret)).allowed
    await counted(stub, org, created.key.id, (1, 0, 0))
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason="done"))
    assert (await authorize(stub, created.secret)).reason == pb.REASON_REVOKED  # not counted: not an answer for it
    old = datetime.now(UTC).date() - timedelta(days=10)
    await db.execute(
        "INSERT INTO key_usage_days (key_id, day, allowed, denied, rate_limited) VALUES ($1::uuid, $2, 7, 1, 0)",
        created.key.id,
        old,
    )
    answer = await usage(stub, org, created.key.id)
    assert (answer.days[-1].allowed, answer.days[-11].allowed, answer.days[-11].date) == (1, 7, old.isoformat())
    fresh = await create(stub, org)
    empty = await usage(stub, org, fresh.key.id)
    assert all(d.allowed == d.denied == d.rate_limited == 0 for d in empty.days) and not empty.HasField(
        "last_used_time"
    )


async def test_another_organizations_key_is_not_found(stub: Stub) -> None:
    created = await create(stub, new_org())
    code, _ = await code_of(usage(stub, new_org(), created.key.id))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"days": 91}, "days must be between 1 and 90"), ({"days": -1}, "days"), ({"key_id": "nope"}, "key_id")],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection, fields: dict[str, object], named: str
) -> None:
    org = new_org()
    created = await create(stub, org)
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    code, message = await code_of(usage(stub, org, str(fields.pop("key_id", created.key.id)), **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in message
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before


async def test_any_role_but_unspecified_may_read_usage(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    await usage(stub, org, created.key.id, actor=MEMBER)
    code, _ = await code_of(usage(stub, org, created.key.id, actor=pb.Actor(user_id="x")))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_usage_report_counts_only_for_the_key_its_digest_proves(app: App, stub: Stub) -> None:
    """WatchDecisions: a key's id, which every upstream sees in ``x-authsvc-key-id``, cannot move its usage.

    Reports on one stream are taken in order, so once the last (proven) entry
    is counted, the entries before it were seen and dropped.
    """
    org = new_org()
    target, other = await create(stub, org), await create(stub, org)
    now = Timestamp()
    now.GetCurrentTime()

    def entry(calls: int, **kw: object) -> pb.KeyUsage:
        return pb.KeyUsage(last_used_time=now, calls_by_reason={pb.REASON_OK: calls}, **kw)  # type: ignore[arg-type]

    forged = [
        entry(1000, key_id=target.key.id),  # the id alone
        entry(1000, key_id=target.key.id, key_digest=digest(other.secret)),  # another key's digest under its id
        entry(1000, key_id=target.key.id, key_digest=b"\0" * 32),  # a digest no key has
        entry(1000, key_id=target.key.id, key_digest=b"\1" * 5),  # not a digest
    ]
    # The other key's own digest, but only calls the server would not count (a revoked key's, say).
    revoked_calls = {int(pb.REASON_REVOKED): 5}
    forged.append(pb.KeyUsage(last_used_time=now, calls_by_reason=revoked_calls, key_digest=digest(other.secret)))
    dropped = value(scrape(app)[1], "authsvc_usage_report_entries_dropped_total")
    call = stub.WatchDecisions()
    try:
        await call.write(pb.WatchDecisionsRequest(usage=forged))
        await call.write(pb.WatchDecisionsRequest(usage=[entry(7, key_digest=digest(target.secret))]))
        await counted(stub, org, target.key.id, (7, 0, 0))
    finally:
        call.cancel()
    assert value(scrape(app)[1], "authsvc_usage_report_entries_dropped_total") == dropped + len(forged) - 1
    assert (await usage(stub, org, other.key.id)).days[-1].allowed == 0
    assert not (await usage(stub, org, other.key.id)).HasField("last_used_time")
