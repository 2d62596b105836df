"""The audit trail's hash chain: verifying it and pruning old events (``authsvc audit verify | prune``).

Migration 0004 makes PostgreSQL chain every inserted event (see its header
for the canonical form); this module only reads the chain and shortens it
from its old end. Verification runs in PostgreSQL, which recomputes each
hash with the same SQL function the insert trigger used, so there is one
definition of the canonical content.

What verification proves: no stored event was altered, removed from the
middle or either end, or moved, unless whoever did it also rewrote every
later hash and the chain's head and anchor. Someone with full write access
to the database can do that; keeping the head hash that ``verify`` prints
somewhere else closes that gap.

Pruning deletes a prefix of each organization's chain (never a gap), in
small batches, each in its own transaction under the chain's row lock, and
moves the chain's anchor to the ``prev_hash`` of the first event kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

PRUNE_BATCH = 500
"""Events deleted per transaction: short locks, so inserts for the same organization barely wait."""
PRUNE_INTERVAL_SECONDS = 3600.0
_PRUNE_BUDGET_SECONDS = 600.0
"""A round that takes longer (a hung database) is abandoned and retried next round."""

_WALK = """
WITH walk AS (
    SELECT e.id, e.occurred_at, e.org_id, c.head_hash,
           e.hash IS DISTINCT FROM audit_event_hash(
               e.prev_hash, e.id, e.occurred_at, e.org_id, e.actor_user_id, e.actor_role, e.caller, e.action,
               e.key_id, e.outcome, e.detail) AS altered,
           e.prev_hash IS DISTINCT FROM coalesce(lag(e.hash) OVER w, c.anchor_hash) AS unlinked,
           lag(e.id) OVER w IS NULL AS is_first,
           lead(e.id) OVER w IS NULL AND e.hash IS DISTINCT FROM c.head_hash AS beheaded
    FROM audit_events AS e LEFT JOIN audit_chains AS c ON c.org_id = e.org_id
    WHERE $1::text IS NULL OR e.org_id = $1
    WINDOW w AS (PARTITION BY e.org_id ORDER BY e.id)
)
SELECT (SELECT count(*) FROM walk) AS events, bad.*
FROM (SELECT) AS one
LEFT JOIN LATERAL (
    SELECT id, occurred_at, org_id, altered, unlinked, is_first, beheaded, head_hash IS NULL AS chainless
    FROM walk WHERE altered OR unlinked OR beheaded
    ORDER BY org_id, id LIMIT 1
) AS bad ON true
"""
# A chain whose events are all gone, though pruning did not remove them.
_EMPTIED = """
SELECT org_id FROM audit_chains AS c
WHERE ($1::text IS NULL OR org_id = $1) AND head_hash <> anchor_hash
  AND NOT EXISTS (SELECT 1 FROM audit_events AS e WHERE e.org_id = c.org_id)
ORDER BY org_id LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first event (in organization, then chain order) at which verification fails."""

    org_id: str
    event_id: int | None
    time: datetime | None
    problem: str

    def describe(self) -> str:
        if self.event_id is None or self.time is None:
            return f"org {self.org_id}: {self.problem}"
        when = self.time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return f"event {self.event_id} at {when} in org {self.org_id}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Verification:
    events: int
    """Events checked."""
    broken: ChainBreak | None


async def verify(conn: asyncpg.Connection, org_id: str | None = None) -> Verification:
    """Check every chain (or one organization's) from its anchor to its head."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(_WALK, org_id)
        emptied = await conn.fetchval(_EMPTIED, org_id)
    assert row is not None
    broken = None
    if row["id"] is not None:
        if row["altered"]:
            problem = "its hash does not match its content: the event was altered"
        elif row["chainless"]:
            problem = "its organization's chain record (audit_chains) is missing"
        elif row["unlinked"] and row["is_first"]:
            problem = "it does not chain onto the chain's anchor: events before it were removed"
        elif row["unlinked"]:
            problem = "it does not chain onto the event before it: events were removed or reordered"
        else:
            problem = "it is the last event but not the chain's head: events after it were removed"
        broken = ChainBreak(row["org_id"], row["id"], row["occurred_at"], problem)
    elif emptied is not None:
        broken = ChainBreak(emptied, None, None, "its chain has a head but no events: events were removed")
    return Verification(int(row["events"]), broken)


async def prune(
    conn: asyncpg.Connection, retention_days: int, *, now: datetime | None = None, batch_size: int = PRUNE_BATCH
) -> int:
    """Delete events older than ``retention_days``; returns how many. ``0`` days keeps everything.

    Only a prefix of each chain is deleted: an event is kept, with every
    later one, as soon as it is within retention, even if an older-stamped
    event follows it (times are transaction start times, ids commit order).
    """
    if retention_days <= 0:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    orgs = await conn.fetch(
        "SELECT org_id FROM audit_chains AS c WHERE EXISTS "
        "(SELECT 1 FROM audit_events AS e WHERE e.org_id = c.org_id AND e.occurred_at < $1) ORDER BY org_id",
        cutoff,
    )
    total = 0
    for record in orgs:
        while True:
            deleted = await _prune_batch(conn, record["org_id"], cutoff, batch_size)
            total += deleted
            if deleted < batch_size:
                break
    return total


async def _prune_batch(conn: asyncpg.Connection, org_id: str, cutoff: datetime, batch_size: int) -> int:
    async with conn.transaction():
        # The chain's row lock: no event of this org is inserted meanwhile.
        await conn.execute("SELECT 1 FROM audit_chains WHERE org_id = $1 FOR UPDATE", org_id)
        oldest = await conn.fetch(
            "SELECT id, occurred_at, hash FROM audit_events WHERE org_id = $1 ORDER BY id LIMIT $2",
            org_id,
            batch_size,
        )
        doomed = []
        for event in oldest:
            if event["occurred_at"] >= cutoff:
                break
            doomed.append(event)
        if not doomed:
            return 0
        last = doomed[-1]
        await conn.execute("DELETE FROM audit_events WHERE org_id = $1 AND id <= $2", org_id, last["id"])
        await conn.execute(
            "UPDATE audit_chains SET anchor_hash = $2, pruned_through_id = $3 WHERE org_id = $1",
            org_id,
            last["hash"],
            last["id"],
        )
    return len(doomed)


class AuditPruner:
    """Prunes the audit trail in the background of a server, once at start and then hourly.

    Every process of every replica runs one. They need no coordination:
    each batch holds its chain's row lock, so a second pruner waits for the
    first and then finds that batch gone. A failure is logged and retried
    next round: pruning never takes serving down.
    """

    def __init__(
        self, pool: asyncpg.Pool, retention_days: int, interval_seconds: float = PRUNE_INTERVAL_SECONDS
    ) -> None:
        self._pool = pool
        self._retention_days = retention_days
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._retention_days > 0:
            self._task = asyncio.create_task(self._run(), name="authsvc-audit-prune")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_once(self) -> int:
        async with asyncio.timeout(_PRUNE_BUDGET_SECONDS), self._pool.acquire() as conn:
            return await prune(conn, self._retention_days)

    async def _run(self) -> None:
        while True:
            try:
                pruned = await self.run_once()
                if pruned:
                    log.info("pruned %d audit events older than %d days", pruned, self._retention_days)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("audit pruning failed, retrying in %.0f s: %s", self._interval, type(exc).__name__)
            await asyncio.sleep(self._interval)
