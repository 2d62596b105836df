"""Listens for key changes on PostgreSQL and keeps this process's cache honest.

Create and revoke publish the key's digest on ``NOTIFY_CHANNEL`` in the same
transaction, as ``<hex digest>:<database clock in epoch microseconds>`` (a
bare hex digest, from an older authsvc, is understood too); the difference to
this process's clock at eviction is the invalidation lag. This listener
evicts on every notification, proves its connection alive with a heartbeat
(which also proves every earlier notification was delivered), and on any loss
desynchronises the cache, so no cached decision is served until it is
subscribed again (see authsvc.cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from authsvc.cache import KeyCache
from authsvc.metrics import NO_METRICS, Recorder
from authsvc.storage.postgres import CONNECTION_ERRORS, NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class InvalidationListener:
    def __init__(self, dsn: str, cache: KeyCache, *, heartbeat: float = 0.2, metrics: Recorder = NO_METRICS) -> None:
        self._dsn = dsn
        self._cache = cache
        self._heartbeat = heartbeat
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self.connected = asyncio.Event()

    @property
    def backend_pid(self) -> int | None:
        """The listening backend's pid (tests terminate it to prove the cache stays safe)."""
        return self._connection.get_server_pid() if self._connection is not None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authsvc-invalidation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notify(self, connection: object, pid: int, channel: str, payload: str) -> None:
        hex_digest, _, committed = payload.partition(":")
        try:
            self._cache.invalidate(bytes.fromhex(hex_digest))
            if committed:
                self._metrics.invalidated(time.time() - int(committed) / 1e6)
        except ValueError:
            # Not ours (anyone may NOTIFY this channel); to be safe, forget
            # everything, but never switch serving back on from here.
            self._cache.clear()

    def _on_lost(self, connection: object) -> None:
        # Only the current subscription matters: a late callback from a
        # connection already replaced must not switch the new one off.
        if connection is self._connection:
            self._cache.desynchronised()
            self.connected.clear()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            connection: asyncpg.Connection | None = None
            subscribed = False
            try:
                connection = await asyncpg.connect(self._dsn, timeout=2.0)
                connection.add_termination_listener(self._on_lost)
                await connection.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self._connection = connection
                subscribed = True
                self._cache.synchronised()
                self.connected.set()
                if backoff > 0.05:
                    log.info("cache invalidation listener reconnected; cache dropped and resynchronised")
                backoff = 0.05
                while not connection.is_closed():
                    await asyncio.sleep(self._heartbeat)
                    async with asyncio.timeout(self._heartbeat * 2):
                        await connection.fetchval("SELECT 1")
                    self._cache.heard_from_store()
            except asyncio.CancelledError:
                self._cache.desynchronised()
                if connection is not None:
                    connection.terminate()
                raise
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                if self.connected.is_set() or backoff == 0.05:
                    log.warning(
                        "cache invalidation listener lost (%s); serving from the database until it is back",
                        type(exc).__name__,
                    )
            except Exception:  # a bug or an odd driver state: keep retrying, loudly, rather than die silently
                log.exception("cache invalidation listener failed; serving from the database and retrying")
            self._cache.desynchronised()
            if subscribed:
                self._metrics.feed_reset()
            self.connected.clear()
            self._connection = None
            if connection is not None:
                connection.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
