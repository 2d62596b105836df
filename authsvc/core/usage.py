"""Batched ``last_used_time`` and daily usage counts: Authorize never waits on a database write.

Uses are collected in memory (one entry per key, the latest time; one
counter triple per key and UTC day) and written by one statement per flush,
every ``interval`` seconds, so the stored values lag by at most ``interval``
plus one write. The store only moves ``last_used_time`` forward, so
out-of-order flushes from several processes never make it go backwards,
and adds counts, so every process's answers are counted once.

Exactness: ``stop`` (a graceful shutdown) writes what is pending, and a
failed flush keeps its counts for the next one, so nothing is lost short of
a crash, which loses at most one interval's counts of that process. A flush
whose write fails after the database committed it (the connection breaks
before the answer arrives) is retried and counted twice; that needs a
connection loss at the exact moment of a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, date, datetime, timedelta

from authsvc.core.ports import KeyStore

log = logging.getLogger(__name__)

#: Indexes into a day's counter triple (``UsageCounts`` values).
ALLOWED, DENIED, RATE_LIMITED = 0, 1, 2
_EPOCH_DAY = date(1970, 1, 1)


class UsageRecorder:
    def __init__(self, store: KeyStore, interval: float, max_pending: int = 100_000) -> None:
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._pending: dict[str, float] = {}
        # (key id, days since the epoch, UTC) -> [allowed, denied, rate limited]
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.dropped = 0

    def touch(self, key_id: str, at: float) -> None:
        """Hot path: a dict store, and a size check."""
        pending = self._pending
        if len(pending) >= self._max_pending:
            self._wake.set()  # flush early rather than grow
            if key_id not in pending and len(pending) >= 2 * self._max_pending:
                # The store is not keeping up: losing a last-used update beats unbounded memory.
                self.dropped += 1
                return
        pending[key_id] = at

    def count(self, key_id: str, at: float, outcome: int, calls: int = 1) -> None:
        """Hot path: one Authorize answer (``ALLOWED``, ``DENIED`` or ``RATE_LIMITED``) for the key's UTC day.

        Bounded like ``touch``: one entry per key and day, however many calls.
        """
        slot = (key_id, int(at // 86400))
        counts = self._counts.get(slot)
        if counts is None:
            if len(self._counts) >= 2 * self._max_pending:
                self.dropped += 1
                return
            counts = self._counts[slot] = [0, 0, 0]
        counts[outcome] += calls

    def use(self, key_id: str, at: float, outcome: int) -> None:
        """Hot path: ``touch`` and ``count`` of one answer, in one call (a call costs as much as either's work)."""
        pending = self._pending
        if len(pending) < self._max_pending:
            pending[key_id] = at
        else:
            self.touch(key_id, at)  # at the bound: flush early, maybe drop
        counts = self._counts.get((key_id, int(at // 86400)))
        if counts is None:
            self.count(key_id, at, outcome)  # the key's first answer of the day, bounded there
        else:
            counts[outcome] += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authsvc-usage-flush")

    async def stop(self) -> None:
        """Let a flush in progress finish (cancelling it would lose its batch), then flush the rest."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        if not self._pending and not self._counts:
            return
        batch, self._pending = self._pending, {}
        counts, self._counts = self._counts, {}
        try:
            await self._store.record_last_used(
                {k: datetime.fromtimestamp(t, UTC) for k, t in batch.items()},
                {(k, _EPOCH_DAY + timedelta(days=d)): (c[0], c[1], c[2]) for (k, d), c in counts.items()},
            )
        except Exception:
            # Counts are added back (they are sums); a failed batch is never lost while the bound allows.
            for slot, triple in counts.items():
                kept = self._counts.setdefault(slot, [0, 0, 0])
                for i in (ALLOWED, DENIED, RATE_LIMITED):
                    kept[i] += triple[i]
            # Keep the newest time per key for the next try, within the bound.
            for key, at in batch.items():
                if len(self._pending) >= self._max_pending:
                    break
                if self._pending.get(key, 0.0) < at:
                    self._pending[key] = at
            log.warning("could not write last_used_time for %d keys; will retry", len(batch))

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()
