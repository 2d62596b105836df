"""The tamper-evident audit trail: PostgreSQL chains every event; ``authsvc audit verify | prune``.

Management calls go through a real server on a real channel; tampering is
done with plain SQL on the real PostgreSQL, as an intruder or a careless
operator would; the commands run as real processes. Every test works in its
own organization and verifies only that one (``--org``), except those on a
database of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.storage import audit
from authsvc.storage.migrate import MIGRATIONS_DIR, migrate
from tests.support import ADMIN, MEMBER, OWNER, Stub, free_port, new_org

ZERO = bytes(32)
INSERT = (
    "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail, occurred_at) "
    "VALUES ($1, 'alice', 'admin', $2, NULL, 'ok', $3::jsonb, coalesce($4, now()))"
)


async def audit_cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``authsvc audit ...`` as an operator runs it (off the event loop, which serves the test server)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    full_env |= {"AUTHSVC_DATABASE_URL": database_url, **env}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "authsvc", "audit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


async def management_calls(stub: Stub, org: str) -> int:
    """A bit of everything: create, read, list, revoke, refusals. Returns the audit rows they write."""
    created = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]))
    await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER))
    await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=OWNER, reason="leaked"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=MEMBER, name="x", scopes=["read"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=str(uuid.uuid4()), actor=MEMBER))
    return 6


async def event_ids(db: asyncpg.Connection, org: str) -> list[int]:
    return [r["id"] for r in await db.fetch("SELECT id FROM audit_events WHERE org_id = $1 ORDER BY id", org)]


def names_event(output: str, event_id: int, org: str) -> bool:
    """The failure line names the event by id, time (ISO 8601, UTC) and organization."""
    when = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z"
    return bool(re.search(rf"event {event_id} at {when} in org {re.escape(org)}:", output))


async def test_verify_passes_after_management_calls_through_a_real_server(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    org = new_org()
    calls = await management_calls(stub, org)
    rows = await db.fetch("SELECT prev_hash, hash, caller FROM audit_events WHERE org_id = $1 ORDER BY id", org)
    assert len(rows) == calls
    assert rows[0]["prev_hash"] == ZERO  # an organization's first event chains onto zeros
    assert all(len(r["hash"]) == 32 and r["caller"] is None for r in rows)
    assert [r["prev_hash"] for r in rows[1:]] == [r["hash"] for r in rows[:-1]]
    result = await audit_cli(database_url, "verify", "--org", org)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"ok {calls}\n", "")


async def test_verify_fails_after_a_row_is_altered_with_sql_and_names_that_row(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    org, bystander = new_org(), new_org()
    await management_calls(stub, org)
    await management_calls(stub, bystander)
    ids = await event_ids(db, org)
    await db.execute("""UPDATE audit_events SET detail = '{"reason": "rotation"}' WHERE id = $1""", ids[3])
    result = await audit_cli(database_url, "verify", "--org", org)
    assert result.returncode == 1
    assert names_event(result.stdout, ids[3], org), result.stdout
    assert "altered" in result.stdout and len(result.stdout.splitlines()) == 1
    # Another organization's chain is unaffected.
    assert (await audit_cli(database_url, "verify", "--org", bystander)).stdout == "ok 6\n"


async def test_verify_fails_after_a_row_is_deleted_from_the_middle(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    org = new_org()
    await management_calls(stub, org)
    ids = await event_ids(db, org)
    await db.execute("DELETE FROM audit_events WHERE id = $1", ids[2])
    result = await audit_cli(database_url, "verify", "--org", org)
    assert result.returncode == 1
    assert names_event(result.stdout, ids[3], org), result.stdout  # the first event after the gap
    assert "removed" in result.stdout


async def test_verify_fails_after_rows_are_reordered(stub: Stub, db: asyncpg.Connection, database_url: str) -> None:
    org = new_org()
    await management_calls(stub, org)
    ids = await event_ids(db, org)
    async with db.transaction():  # swap the ids of two events: each row is intact, their order is not
        await db.execute("UPDATE audit_events SET id = -1 WHERE id = $1", ids[1])
        await db.execute("UPDATE audit_events SET id = $1 WHERE id = $2", ids[1], ids[2])
        await db.execute("UPDATE audit_events SET id = $1 WHERE id = -1", ids[2])
    result = await audit_cli(database_url, "verify", "--org", org)
    assert result.returncode == 1
    assert names_event(result.stdout, ids[1], org), result.stdout


async def test_verify_fails_when_the_newest_or_the_oldest_events_are_deleted(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    """The chain's head and anchor are recorded too, so cutting either end is seen."""
    newest, oldest = new_org(), new_org()
    await management_calls(stub, newest)
    await management_calls(stub, oldest)
    ids = await event_ids(db, newest)
    await db.execute("DELETE FROM audit_events WHERE id = ANY($1)", ids[-2:])
    result = await audit_cli(database_url, "verify", "--org", newest)
    assert result.returncode == 1
    assert names_event(result.stdout, ids[-3], newest) and "after it were removed" in result.stdout

    ids = await event_ids(db, oldest)
    await db.execute("DELETE FROM audit_events WHERE id = $1", ids[0])
    result = await audit_cli(database_url, "verify", "--org", oldest)
    assert result.returncode == 1
    assert names_event(result.stdout, ids[1], oldest) and "before it were removed" in result.stdout


async def test_verify_passes_after_pruning_and_anchors_on_the_first_event_kept(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    org = new_org()
    long_ago = datetime.now(UTC) - timedelta(days=500)
    for n in range(3):  # events from before the retention period, then today's
        await db.execute(INSERT, org, "key.get", json.dumps({"n": str(n)}), long_ago + timedelta(minutes=n))
    calls = await management_calls(stub, org)
    assert (await audit_cli(database_url, "verify", "--org", org)).stdout == f"ok {calls + 3}\n"

    pruned = await audit_cli(database_url, "prune", AUTHSVC_AUDIT_RETENTION_DAYS="400")
    assert pruned.returncode == 0, pruned.stderr
    assert re.fullmatch(r"pruned \d+ event\(s\) older than 400 days\n", pruned.stdout)
    remaining = await db.fetch("SELECT occurred_at, prev_hash FROM audit_events WHERE org_id = $1 ORDER BY id", org)
    assert len(remaining) == calls and all(r["occurred_at"] > long_ago + timedelta(days=1) for r in remaining)
    assert remaining[0]["prev_hash"] != ZERO
    assert (await audit_cli(database_url, "verify", "--org", org)).stdout == f"ok {calls}\n"

    # The anchor is the pruned chain's, not whatever comes first: deleting more is still seen.
    ids = await event_ids(db, org)
    await db.execute("DELETE FROM audit_events WHERE id = $1", ids[0])
    assert (await audit_cli(database_url, "verify", "--org", org)).returncode == 1


async def test_prune_works_in_batches_and_deletes_only_a_prefix_of_each_chain(db: asyncpg.Connection) -> None:
    """An old-stamped event after one within retention is kept with it: a chain never gets a gap."""
    org = new_org()
    long_ago = datetime.now(UTC) - timedelta(days=500)
    for n in range(7):
        await db.execute(INSERT, org, "key.get", json.dumps({"n": str(n)}), long_ago)
    await db.execute(INSERT, org, "key.get", "{}", None)  # within retention
    await db.execute(INSERT, org, "key.get", "{}", long_ago)  # old-stamped, but after it
    assert await audit.prune(db, 400, batch_size=2) >= 7
    left = await db.fetch("SELECT occurred_at FROM audit_events WHERE org_id = $1 ORDER BY id", org)
    assert len(left) == 2 and left[1]["occurred_at"] == long_ago
    assert await audit.verify(db, org) == audit.Verification(2, None)
    assert await audit.prune(db, 0) == 0  # 0 days: keep forever


async def test_concurrent_inserts_in_one_organization_keep_the_chain_valid(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    """8 connections inserting at once, plus RPCs through the server, into one organization."""
    org = new_org()
    created = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]))

    async def writer(n: int) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for i in range(25):
                await conn.execute(INSERT, org, "key.get", json.dumps({"w": str(n), "i": str(i)}), None)
        finally:
            await conn.close()

    reads = [stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER)) for _ in range(40)]
    await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(8)), *reads), 60)
    result = await audit_cli(database_url, "verify", "--org", org)
    assert (result.returncode, result.stdout) == (0, f"ok {1 + 8 * 25 + 40}\n")


async def test_a_repeatable_read_insert_that_would_fork_the_chain_fails_instead(
    db: asyncpg.Connection, database_url: str
) -> None:
    org = new_org()
    await db.execute(INSERT, org, "key.get", "{}", None)
    late = await asyncpg.connect(database_url)
    try:
        transaction = late.transaction(isolation="repeatable_read")
        await transaction.start()
        await late.fetchval("SELECT count(*) FROM audit_chains")  # its snapshot is taken here
        await db.execute(INSERT, org, "key.get", "{}", None)  # the chain moves on meanwhile
        with pytest.raises(asyncpg.SerializationError):
            await late.execute(INSERT, org, "key.get", "{}", None)
        await transaction.rollback()
    finally:
        await late.close()
    assert await audit.verify(db, org) == audit.Verification(2, None)


@pytest.fixture
async def own_database(database_url: str) -> AsyncIterator[str]:
    """An empty database on the same server, for tests that verify every chain or migrate step by step."""
    name = f"authsvc_chain_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(database_url)
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_the_migration_chains_events_written_before_it(own_database: str, tmp_path: Path) -> None:
    """Existing rows are backfilled in order; inserts written the old way keep working and are chained."""
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[123]_*.sql")):
        shutil.copy(path, before)
    conn = await asyncpg.connect(own_database)
    try:
        await migrate(conn, before)
        for n in range(10):
            await conn.execute(
                "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail) "
                "VALUES ($1, 'alice', 'admin', 'key.get', NULL, 'ok', $2::jsonb)",
                f"org-{n % 3}",
                json.dumps({"n": str(n)}),
            )
        assert (await migrate(conn))[0] == "0004_chain_audit_events"  # then the later steps
        await conn.execute(
            "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail) "
            "VALUES ('org-1', 'bob', 'owner', 'key.list', NULL, 'ok', '{}')"
        )
        assert await conn.fetchval("SELECT count(*) FROM audit_events WHERE hash IS NULL") == 0
    finally:
        await conn.close()
    result = await audit_cli(own_database, "verify")  # every organization
    assert (result.returncode, result.stdout) == (0, "ok 11\n")

    conn = await asyncpg.connect(own_database)
    try:
        first_of_org_2 = await conn.fetchval("SELECT min(id) FROM audit_events WHERE org_id = 'org-2'")
        await conn.execute("UPDATE audit_events SET actor_user_id = 'mallory' WHERE id = $1", first_of_org_2)
        # The server's background pruner is the same function: nothing is old enough here.
        pool = await asyncpg.create_pool(own_database, min_size=1, max_size=1)
        try:
            assert await audit.AuditPruner(pool, 400).run_once() == 0
        finally:
            await pool.close()
    finally:
        await conn.close()
    result = await audit_cli(own_database, "verify")
    assert result.returncode == 1
    assert names_event(result.stdout, first_of_org_2, "org-2"), result.stdout


async def test_audit_commands_fail_in_one_line_without_a_database() -> None:
    result = await audit_cli(f"postgresql://nobody@127.0.0.1:{free_port()}/authsvc", "verify")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "AUTHSVC_DATABASE_URL" in result.stderr
