"""The PostgreSQL invalidation feed: LISTEN/NOTIFY delivered to each process's decision cache.

Every write that can change an answer publishes the key's digest on
``NOTIFY_CHANNEL`` in the same transaction (``authsvc.storage.postgres``),
as ``<hex digest>:<database clock in epoch microseconds>`` (a bare hex
digest, from an older authsvc, is understood too); the difference to this
process's clock at eviction is the invalidation lag (a metric). This feed
(``authsvc.core.ports.InvalidationFeed``) evicts on every notification,
proves its connection alive with a heartbeat, and on any loss
desynchronises its subscribers, so no cached decision is served until it is
subscribed again (the rules are ``authsvc_client._cache``'s).

A heartbeat's answer proves that every notification committed before the
heartbeat was *sent* has been delivered (one connection, in order), so
freshness counts from the send time, not from when the answer came back.

It follows the writable primary only (``authsvc.storage.topology``): a
standby never publishes the primary's notifications. The heartbeat
re-checks that the server still takes writes, and each (re)subscription
tells the subscribers which server it now follows, so rows read elsewhere
are never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import Callable

import asyncpg

from authsvc.core.ports import NO_METRICS, FeedSubscriber, Recorder
from authsvc.storage.postgres import CONNECTION_ERRORS, NOTIFY_CHANNEL
from authsvc.storage.topology import NOT_WRITABLE, NotPrimary, connect_options, identify

log = logging.getLogger(__name__)
#: Cached decisions are served at most this long after the last proof that the feed is alive.
FRESHNESS = 0.1
# A heartbeat every 25 ms keeps a live feed within FRESHNESS (100 ms) even
# when a reply takes tens of milliseconds; a reply slower than _DEAD_AFTER
# means the connection is replaced. In between, the cache is simply not served.
HEARTBEAT = 0.025
_DEAD_AFTER = 0.5
assert HEARTBEAT * 3 < FRESHNESS


class PostgresFeed:
    def __init__(self, dsn: str, *, heartbeat: float = HEARTBEAT, metrics: Recorder = NO_METRICS) -> None:
        self._dsn = dsn
        self._metrics = metrics
        self._subscribers: list[FeedSubscriber] = []
        self._heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self.connected = asyncio.Event()

    def subscribe(self, subscriber: FeedSubscriber) -> None:
        self._subscribers.append(subscriber)

    @property
    def backend_pid(self) -> int | None:
        """The listening backend's pid (tests terminate it to prove the cache stays safe)."""
        return self._connection.get_server_pid() if self._connection is not None else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authsvc-invalidation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notify(self, connection: object, pid: int, channel: str, payload: str) -> None:
        hex_digest, _, committed = payload.partition(":")
        try:
            key_digest = bytes.fromhex(hex_digest)
            committed_at = int(committed) / 1e6 if committed else None
        except ValueError:
            # Not ours (anyone may NOTIFY this channel); to be safe, forget
            # everything, but never switch serving back on from here.
            for subscriber in self._subscribers:
                subscriber.clear()
            return
        for subscriber in self._subscribers:
            subscriber.evict(key_digest)
        if committed_at is not None:
            self._metrics.invalidated(time.time() - committed_at)

    def _desynchronise(self) -> None:
        for subscriber in self._subscribers:
            subscriber.desynchronised()
        self.connected.clear()

    def _on_lost(self, connection: object) -> None:
        # Only the current subscription matters: a late callback from a
        # connection already replaced must not switch the new one off.
        if connection is self._connection:
            self._desynchronise()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            connection: asyncpg.Connection | None = None
            subscribed = False
            try:
                connection = await asyncpg.connect(self._dsn, timeout=2.0, **connect_options(self._dsn))
                connection.add_termination_listener(self._on_lost)
                server = await identify(connection)
                subscribed_at = time.monotonic()
                await connection.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self._connection = connection
                subscribed = True
                alive = _open_probe(connection)
                for subscriber in self._subscribers:
                    subscriber.synchronised(subscribed_at, server, alive)
                self.connected.set()
                if backoff > 0.05:
                    log.info("cache invalidation listener reconnected; cache dropped and resynchronised")
                backoff = 0.05
                sent_at = subscribed_at
                while not connection.is_closed():
                    # Paced from the previous send, not from its reply: a slow
                    # reply must not also delay the next proof of freshness.
                    await asyncio.sleep(max(0.0, sent_at + self._heartbeat - time.monotonic()))
                    sent_at = time.monotonic()
                    async with asyncio.timeout(_DEAD_AFTER):
                        not_writable = await connection.fetchval(NOT_WRITABLE)
                    if not_writable:
                        raise NotPrimary("the listener's server no longer takes writes")
                    for subscriber in self._subscribers:
                        subscriber.alive(sent_at)
            except asyncio.CancelledError:
                self._desynchronise()
                if connection is not None:
                    connection.terminate()
                raise
            except (*CONNECTION_ERRORS, asyncpg.PostgresError, asyncpg.InternalClientError, NotPrimary) as exc:
                # InternalClientError: a heartbeat sent as the backend was killed
                # finds the driver still consuming the error; the connection is gone either way.
                if self.connected.is_set() or backoff == 0.05:
                    log.warning(
                        "cache invalidation listener lost (%s); serving from the database until it is back",
                        type(exc).__name__,
                    )
            except Exception:  # a bug or an odd driver state: keep retrying, loudly, rather than die silently
                log.exception("cache invalidation listener failed; serving from the database and retrying")
            self._desynchronise()
            if subscribed:
                self._metrics.feed_reset()
            self._connection = None
            if connection is not None:
                connection.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


def _open_probe(connection: asyncpg.Connection) -> Callable[[], bool] | None:
    """Whether the feed's connection is still open, known from the socket before the driver reads its end.

    The driver learns that the server closed (or reset) the connection only
    when the loop runs its read callback, and a request read before that
    would be answered from the cache: the kernel's readiness order is not
    arrival order, and under TLS the transport reports closing a turn after
    the raw socket's end was read. So every cached answer asks the socket
    itself, with a ``poll(0)`` for a hang-up (about 0.5 us; a verdict kept
    for a loop turn is not safe, since uvloop runs queued callbacks before
    the poll that reads the next requests). A request that arrives after the
    feed's end is looked up, and the lookup fails: never answered from the
    cache.

    Only the end of the stream counts, not unread data: a heartbeat reply
    waits unread in most busy turns, and holding the cache for it would turn
    a share of hits into lookups. A notification not yet read is the usual
    delivery delay, inside the freshness bound. asyncpg keeps its transport
    private, and ``POLLRDHUP`` is Linux's, hence the guards: without them
    the cache relies on ``is_closing()``, the termination callback and the
    heartbeat alone.
    """
    transport = getattr(connection, "_transport", None)
    is_closing = getattr(transport, "is_closing", None)
    get_extra_info = getattr(transport, "get_extra_info", None)
    if not callable(is_closing) or not callable(get_extra_info):
        return None
    hang_up = getattr(select, "POLLRDHUP", 0)
    try:
        fd = get_extra_info("socket").fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):
        fd, poller = -1, None
    if poller is None or not hang_up:
        return lambda: not is_closing() and not connection.is_closed()
    poller.register(fd, hang_up)  # POLLHUP, POLLERR and POLLNVAL are always reported too
    poll = poller.poll
    # is_closed() before the poll: a closed descriptor's number may already belong to another socket.
    return lambda: not is_closing() and not connection.is_closed() and not poll(0)
