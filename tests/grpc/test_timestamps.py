"""Timestamps: each one is stored and read back as the instant the caller sent, or refused before anything is written.

Table-driven over every RPC field that takes a ``google.protobuf.Timestamp``
(today only ``CreateKey.expire_time``; a new one adds a row to
``TIMESTAMP_FIELDS``) times the extremes in ``CASES``. Every case runs in an
organization that already holds a key, and afterwards that organization is
read back through ListKeys and GetKey: one bad value once made both answer
INTERNAL for good (an ``expire_time`` of 9999-12-31T23:59:59.999999Z was
written as ``infinity``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.storage import migrate
from tests.grpc.test_lifecycle import authorize, code_of, create
from tests.support import ADMIN, MEMBER, Stub, new_org

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
RANGE = "must be after 0001-01-01T00:00:00Z and before 9999-12-31T23:59:59.999999Z"
PAST = "must be in the future"


def _in_a_day() -> int:
    return int((datetime.now(UTC) + timedelta(days=1)).timestamp())


@dataclass(frozen=True)
class Case:
    name: str
    seconds: int | Callable[[], int]
    nanos: int
    # None: accepted, read back as ``stored`` (microseconds); else the message part of the INVALID_ARGUMENT.
    refused: str | None = None
    stored_micros: int | None = None  # the sub-second part read back, when accepted

    def timestamp(self) -> Timestamp:
        seconds = self.seconds() if callable(self.seconds) else self.seconds
        return Timestamp(seconds=seconds, nanos=self.nanos)


CASES = [
    # The reported value: asyncpg writes datetime.max as infinity.
    Case("9999-12-31T23:59:59.999999Z", MAX_SECONDS, 999_999_000, RANGE),
    # Truncates to the same datetime.max: refused too, not rounded into range.
    Case("9999-12-31T23:59:59.999999999Z", MAX_SECONDS, 999_999_999, RANGE),
    Case("the last storable microsecond", MAX_SECONDS, 999_998_000, stored_micros=999_998),
    Case("nanoseconds below it truncate", MAX_SECONDS, 999_998_999, stored_micros=999_998),
    Case("year 10000", MAX_SECONDS + 1, 0, RANGE),
    Case("int64 max seconds", INT64_MAX, 0, RANGE),
    Case("int64 min seconds", -INT64_MAX - 1, 0, RANGE),
    # datetime.min is -infinity to the driver.
    Case("0001-01-01T00:00:00Z", MIN_SECONDS, 0, RANGE),
    Case("before year 1", MIN_SECONDS - 1, 0, RANGE),
    Case("the first storable microsecond (in the past)", MIN_SECONDS, 1_000, PAST),
    Case("the epoch (in the past)", 0, 0, PAST),
    Case("negative nanos", _in_a_day, -1, "nanos must be between 0 and 999999999"),
    Case("a whole second of nanos", _in_a_day, 1_000_000_000, "nanos must be between 0 and 999999999"),
    Case("int32 max nanos", _in_a_day, INT32_MAX, "nanos must be between 0 and 999999999"),
    Case("int32 min nanos", _in_a_day, -INT32_MAX - 1, "nanos must be between 0 and 999999999"),
    # A client sending its nanosecond clock as is.
    Case("a nanosecond clock reading", _in_a_day, 123_456_789, stored_micros=123_456),
    Case("the largest nanos", _in_a_day, 999_999_999, stored_micros=999_999),
]


@dataclass(frozen=True)
class TimestampField:
    """One RPC field taking a Timestamp: how to send it, and where the stored value reads back."""

    name: str
    send: Callable[[Stub, str, Timestamp], Awaitable[str]]  # -> the id of the key it wrote or changed
    read_back: Callable[[pb.ApiKey], Timestamp]


async def _create_with_expiry(stub: Stub, org: str, stamp: Timestamp) -> str:
    return (await create(stub, org, name="stamped", expire_time=stamp)).key.id


TIMESTAMP_FIELDS = [TimestampField("CreateKey.expire_time", _create_with_expiry, lambda key: key.expire_time)]


async def _rows(db: asyncpg.Connection, org: str) -> tuple[int, int]:
    keys = await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org)
    audits = await db.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org)
    return int(keys), int(audits)


@pytest.mark.parametrize("field", TIMESTAMP_FIELDS, ids=[f.name for f in TIMESTAMP_FIELDS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_timestamp_is_stored_as_sent_or_refused_and_the_org_still_reads_back(
    stub: Stub, db: asyncpg.Connection, field: TimestampField, case: Case
) -> None:
    org = new_org()
    existing = (await create(stub, org, name="existing")).key.id
    before = await _rows(db, org)
    stamp = case.timestamp()
    if case.refused is not None:
        code, details = await code_of(field.send(stub, org, stamp))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert case.refused in details and field.name.split(".")[-1] in details
        assert await _rows(db, org) == before  # nothing written, not even an audit row
        expected_keys = {existing}
    else:
        written = await field.send(stub, org, stamp)
        key = (await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=written, actor=MEMBER))).key
        assert field.read_back(key) == Timestamp(seconds=stamp.seconds, nanos=(case.stored_micros or 0) * 1000)
        expected_keys = {existing, written}
    # The organization still answers, every key of it, through both reads.
    listed = await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))
    assert {k.id for k in listed.data} == expected_keys and listed.total == len(expected_keys)
    for key_id in expected_keys:
        got = await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=key_id, actor=MEMBER))
        assert got.key.id == key_id


async def test_a_key_expiring_at_the_last_storable_microsecond_authorizes(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org, expire_time=Timestamp(seconds=MAX_SECONDS, nanos=999_998_000))
    reply = await authorize(stub, created.secret, "read")
    assert (reply.allowed, reply.principal.key_id) == (True, created.key.id)
    assert created.key.state == pb.KEY_STATE_ACTIVE


# The database refuses infinite timestamps itself, whatever code writes them ----


@pytest.mark.parametrize("column", ["create_time", "expire_time", "revoke_time", "last_used_time"])
@pytest.mark.parametrize("value", ["infinity", "-infinity"])
async def test_the_schema_refuses_an_infinite_timestamp(db: asyncpg.Connection, column: str, value: str) -> None:
    org = new_org()
    times = {"create_time": "now()", "expire_time": "NULL", "revoke_time": "NULL", "last_used_time": "NULL"}
    times[column] = f"'{value}'::timestamptz"
    with pytest.raises(asyncpg.CheckViolationError, match="api_keys_timestamps_finite"):
        await db.execute(
            "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scopes, created_by, "
            f"create_time, expire_time, revoke_time, last_used_time) VALUES ($1, $2, 'n', 'p', $3, '{{read}}', 'u', "
            f"{times['create_time']}, {times['expire_time']}, {times['revoke_time']}, {times['last_used_time']})",
            uuid.uuid4(),
            org,
            uuid.uuid4().bytes * 2,
        )
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 0


async def test_the_guard_migration_repairs_a_database_that_already_holds_an_infinite_expiry(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An organization bricked before the fix reads back after the upgrade: infinity meant "never expires"."""
    schema = f"upgrade_{uuid.uuid4().hex[:8]}"
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for step in migrate.migrations()[:3]:
        (earlier / f"{step.version:04d}_{step.name}.sql").write_text(step.sql)
    await db.execute(f"CREATE SCHEMA {schema}")
    try:
        await db.execute(f"SET search_path TO {schema}")
        assert len(await migrate.migrate(db, earlier)) == 3
        for expire, used in (("infinity", "NULL"), ("-infinity", "NULL"), ("NULL", "infinity")):
            await db.execute(
                "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scopes, created_by, create_time, "
                f"expire_time, last_used_time) VALUES ($1, 'o', 'n', 'p', $2, '{{read}}', 'u', now(), "
                f"{expire if expire == 'NULL' else repr(expire) + '::timestamptz'}, "
                f"{used if used == 'NULL' else repr(used) + '::timestamptz'})",
                uuid.uuid4(),
                uuid.uuid4().bytes * 2,
            )
        assert "0007_forbid_infinite_timestamps" in await migrate.migrate(db)  # with the later steps
        stored = await db.fetch(
            "SELECT expire_time IS NULL AS never, expire_time = create_time AS expired_at_creation, "
            "last_used_time IS NULL AS unused FROM api_keys ORDER BY expire_time NULLS FIRST"
        )
        assert await db.fetchval(
            "SELECT count(*) FROM api_keys WHERE NOT isfinite(expire_time) OR NOT isfinite(last_used_time)"
        ) == 0
        assert sorted(tuple(r) for r in stored) == sorted([(True, None, True), (True, None, True), (False, True, True)])
    finally:
        await db.execute("SET search_path TO DEFAULT")
        await db.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_nothing_else_of_the_org_is_touched_by_a_refused_timestamp(stub: Stub, db: asyncpg.Connection) -> None:
    """The reported sequence, end to end: the bad create is refused and the org's existing key keeps working."""
    org = new_org()
    kept = await create(stub, org)
    forever = Timestamp(seconds=MAX_SECONDS, nanos=999_999_000)
    request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="forever", scopes=["read"], expire_time=forever)
    code, _ = await code_of(stub.CreateKey(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await authorize(stub, kept.secret, "read")).allowed
    assert (await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))).total == 1
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1 AND NOT isfinite(expire_time)", org) == 0
