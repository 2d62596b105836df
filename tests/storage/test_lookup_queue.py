"""PostgresStore's lookup queue under a flood: bounded, and rid of lookups nobody waits for.

Against the real PostgreSQL: a transaction of the test's own holds an
ACCESS EXCLUSIVE lock on ``api_keys`` so lookups really wait. The memory
store has no queue (no I/O), so this is not part of the contract suite.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from authsvc.core.errors import Unavailable
from authsvc.storage.postgres import PostgresStore, create_pool, run_migrations


@pytest.fixture
async def blocked(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await run_migrations(database_url)
    conn = await asyncpg.connect(database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
    yield conn
    await tx.rollback()
    await conn.close()


async def outcome(store: PostgresStore) -> tuple[str, float]:
    start = time.monotonic()
    try:
        await store.find_by_digest(os.urandom(32))
    except Unavailable as exc:
        return str(exc), time.monotonic() - start
    return "found", time.monotonic() - start


async def test_lookups_past_the_bound_are_refused_at_once_and_abandoned_ones_free_their_place(
    database_url: str, blocked: asyncpg.Connection
) -> None:
    """8 waiting: the 9th is refused at once; once their callers give up, 8 new ones may wait again."""
    pool = await create_pool(database_url)
    try:
        store = PostgresStore(pool, lookup_timeout=0.5, max_waiting_lookups=8)
        in_flight = asyncio.create_task(outcome(store))  # dispatched at once: the batch stuck on the lock
        await asyncio.sleep(0.1)
        waiting = [asyncio.create_task(outcome(store)) for _ in range(8)]
        await asyncio.sleep(0.05)
        refused = await asyncio.gather(*(outcome(store) for _ in range(20)))
        for task in waiting:  # their callers give up (a client cancels its call) while the batch is still stuck
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        again = [asyncio.create_task(outcome(store)) for _ in range(8)]
        await asyncio.sleep(0.05)
        refused_again = await outcome(store)
        second = await asyncio.gather(*again)
        first = await in_flight
    finally:
        await pool.close()
    assert all("too many key lookups" in o and s < 0.05 for o, s in refused), refused
    assert "unavailable" in first[0]
    # The abandoned eight left the queue: eight newcomers wait (and time out) instead of being refused.
    assert all("unavailable" in o and s >= 0.45 for o, s in second), second
    assert "too many key lookups" in refused_again[0]
