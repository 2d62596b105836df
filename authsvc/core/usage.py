"""Batched ``last_used_time``: Authorize never waits on a database write.

Uses are collected in memory (one entry per key, the latest time) and
written by one statement per flush, every ``interval`` seconds, so the
stored value lags by at most ``interval`` plus one write. The store only
moves the value forward, so out-of-order flushes from several processes
never make it go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from authsvc.core.ports import KeyStore

log = logging.getLogger(__name__)


class UsageRecorder:
    def __init__(self, store: KeyStore, interval: float, max_pending: int = 100_000) -> None:
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._pending: dict[str, float] = {}
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
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_last_used({k: datetime.fromtimestamp(t, UTC) for k, t in batch.items()})
        except Exception:
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
