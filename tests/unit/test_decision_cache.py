"""The decision cache's safety rules (issue 4): never serve what a missed notification could have changed.

One cache module serves authsvc's server and client-side caches alike
(``authsvc_client._cache``); its clock is injected, so these run without sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from authsvc_client._cache import MISS, DecisionCache

from authsvc.core.keys import ApiKey, KeyGrant, ScopeCatalog

CATALOG = ScopeCatalog.from_mapping({"scopes": {"read": {}}}, "test")
GRANT = KeyGrant.of(
    ApiKey(
        id="k1",
        org_id="o",
        name="n",
        prefix="authsvc_abcd",
        scopes=("read",),
        created_by="u",
        create_time=datetime.now(UTC),
    ),
    CATALOG,
)
D1, D2 = b"1" * 32, b"2" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def synced(size: int = 10, clock: Clock | None = None) -> DecisionCache[KeyGrant]:
    clock = clock or Clock()
    cache: DecisionCache[KeyGrant] = DecisionCache(size, 1.0, clock)
    cache.synchronised(clock.now)
    return cache


def test_hit_after_put() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is GRANT


def test_negative_entries_are_cached() -> None:
    cache = synced()
    cache.put(D1, None, cache.epoch)
    assert cache.get(D1) is None


def test_nothing_is_served_before_the_listener_is_subscribed() -> None:
    cache: DecisionCache[KeyGrant] = DecisionCache(10, 1.0, Clock())
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS


def test_losing_the_listener_drops_and_stops_serving() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    cache.desynchronised()
    assert cache.get(D1) is MISS
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS
    cache.synchronised(100.0)
    assert cache.get(D1) is MISS  # resynchronised from empty: missed notifications cannot matter


def test_a_read_that_raced_an_invalidation_is_not_stored() -> None:
    cache = synced()
    epoch = cache.epoch  # lookup starts
    cache.evict(D2)  # a revocation lands while it reads
    cache.put(D1, GRANT, epoch)
    assert cache.get(D1) is MISS


def test_evict_evicts() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    cache.evict(D1)
    assert cache.get(D1) is MISS


def test_stale_heartbeat_stops_serving() -> None:
    clock = Clock()
    cache = synced(clock=clock)
    cache.put(D1, GRANT, cache.epoch)
    clock.now += 1.0
    assert cache.get(D1) is MISS
    cache.alive(clock.now)
    assert cache.get(D1) is GRANT


def test_freshness_counts_from_when_the_heartbeat_was_sent() -> None:
    """A heartbeat answered late proves only what was committed before it was sent."""
    clock = Clock()
    cache = synced(clock=clock)
    cache.put(D1, GRANT, cache.epoch)
    sent = clock.now + 0.5
    clock.now += 1.4  # the answer came back 0.9 s after it was sent
    cache.alive(sent)
    assert cache.get(D1) is GRANT  # good until sent + 1.0
    clock.now = sent + 1.0
    assert cache.get(D1) is MISS


def test_a_late_heartbeat_never_shortens_freshness() -> None:
    clock = Clock()
    cache = synced(clock=clock)
    cache.put(D1, GRANT, cache.epoch)
    cache.alive(clock.now + 0.5)
    cache.alive(clock.now)  # an older heartbeat answered after a newer one
    clock.now += 1.2
    assert cache.get(D1) is GRANT


def test_size_is_bounded_least_recently_used_first() -> None:
    cache = synced(size=2)
    cache.put(D1, GRANT, cache.epoch)
    cache.put(D2, GRANT, cache.epoch)
    cache.get(D1)
    cache.put(b"3" * 32, GRANT, cache.epoch)
    assert len(cache) == 2
    assert cache.get(D2) is MISS
    assert cache.get(D1) is GRANT


def test_size_zero_disables_caching() -> None:
    cache = synced(size=0)
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS


def test_clear_forgets_entries_but_never_switches_serving_on() -> None:
    """An odd notification payload clears the cache; it must not re-enable a desynchronised one."""
    cache: DecisionCache[KeyGrant] = DecisionCache(10, 1.0, Clock())
    cache.desynchronised()
    cache.clear()
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS
    live = synced()
    live.put(D1, GRANT, live.epoch)
    live.clear()
    assert live.get(D1) is MISS
    live.put(D1, GRANT, live.epoch)
    assert live.get(D1) is GRANT


def test_a_flood_of_unknown_keys_cannot_push_real_keys_out() -> None:
    cache = synced(size=10)
    cache.put(D1, GRANT, cache.epoch)
    for i in range(1000):
        cache.put(i.to_bytes(32, "big"), None, cache.epoch)
    assert cache.get(D1) is GRANT
    assert len(cache) <= 10 + 1


def test_hits_and_misses_are_counted() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    cache.get(D1)
    cache.get(D2)
    assert (cache.hits, cache.misses) == (1, 1)


def test_rows_read_from_a_server_other_than_the_feeds_are_not_stored() -> None:
    """A lagging standby or a former primary may still hold a row the feed has announced as revoked."""
    feed, other = object(), object()
    cache: DecisionCache[KeyGrant] = DecisionCache(10, 1.0, Clock())
    cache.synchronised(100.0, feed)
    cache.put(D1, GRANT, cache.epoch, other)
    cache.put(D2, None, cache.epoch, other)
    assert cache.get(D1) is MISS
    assert cache.get(D2) is MISS
    cache.put(D1, GRANT, cache.epoch, feed)
    assert cache.get(D1) is GRANT


def test_a_new_feed_starts_from_empty_and_refuses_the_old_feeds_rows() -> None:
    """A failover: the listener follows another server; nothing from before is served or stored."""
    old, new = object(), object()
    cache: DecisionCache[KeyGrant] = DecisionCache(10, 1.0, Clock())
    cache.synchronised(100.0, old)
    cache.put(D1, GRANT, cache.epoch, old)
    cache.synchronised(100.0, new)
    assert cache.get(D1) is MISS
    cache.put(D1, GRANT, cache.epoch, old)
    assert cache.get(D1) is MISS


def test_the_servers_freshness_bound_is_at_most_100_ms_with_heartbeats_well_inside_it() -> None:
    from authsvc.storage.notify import FRESHNESS, HEARTBEAT

    assert FRESHNESS <= 0.1
    assert HEARTBEAT * 3 < FRESHNESS


def test_a_closed_feed_connection_stops_serving_before_the_driver_reports_it() -> None:
    """The probe is read on every hit: a closed socket stops cached answers in the very loop turn it is seen."""
    open_ = [True]
    cache: DecisionCache[KeyGrant] = DecisionCache(10, 1.0, Clock())
    cache.synchronised(100.0, None, lambda: open_[0])
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is GRANT
    open_[0] = False
    assert cache.get(D1) is MISS
    assert not cache.serving
    cache.desynchronised()
    cache.synchronised(100.0)  # a new subscription without a probe: served on the heartbeat rules alone
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is GRANT


async def test_the_feed_probe_sees_its_connection_closed_at_once(database_url: str) -> None:
    """Against a real connection: the probe turns false as soon as the socket is closed, no loop turn needed."""
    import asyncpg

    from authsvc.storage.notify import _open_probe

    connection = await asyncpg.connect(database_url)
    probe = _open_probe(connection)
    assert probe is not None, "asyncpg no longer exposes its transport: the cache is back to is_closed() alone"
    assert probe()
    connection.terminate()  # closes the transport synchronously, as reading EOF does
    assert not probe()


def _blocking(work: Callable[[], Awaitable[object]]) -> None:
    """Run ``work`` on its own loop in another thread and wait for it, without giving this loop a turn."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work())  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and not failure, failure


async def test_the_feed_probe_sees_the_peer_close_before_the_loop_reads_it(database_url: str) -> None:
    """The real failure: the database side goes away, and a request read in the same loop turn asks the cache.

    The loop is not given a turn between the cut and the probe (the kernel's
    readiness order may put the request first), and the probe was already
    asked in the same turn (uvloop runs queued callbacks before the poll that
    reads the next requests), so only asking the socket on every call can tell.
    """
    import asyncpg

    from authsvc.storage.notify import _open_probe
    from tests.support import TcpProxy

    proxy = TcpProxy.for_database(database_url)
    connection = await asyncpg.connect(proxy.url_for(database_url))
    try:
        probe = _open_probe(connection)
        assert probe is not None and probe()  # asked once already in this loop turn: no verdict may be kept
        proxy.cut()
        time.sleep(0.05)  # noqa: ASYNC251 - blocking on purpose: the end of stream is in the kernel, unread by the loop
        assert not connection.is_closed(), "the driver saw the close already: this test proves nothing"
        assert not probe()
    finally:
        proxy.close()
        connection.terminate()


async def test_the_feed_probe_is_not_fooled_by_unread_data(database_url: str) -> None:
    """A notification (or a heartbeat reply) waiting to be read is not a hang-up: hits go on being served.

    Holding the cache for unread bytes would turn a share of hits into
    lookups in every busy loop turn; an unread notification is the usual
    delivery delay, inside the freshness bound.
    """
    import asyncpg

    from authsvc.storage.notify import _open_probe
    from authsvc.storage.postgres import NOTIFY_CHANNEL

    connection = await asyncpg.connect(database_url)
    heard: list[str] = []
    await connection.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[-1]))
    try:
        probe = _open_probe(connection)
        assert probe is not None and probe()
        await asyncio.sleep(0)

        async def notify() -> None:
            other = await asyncpg.connect(database_url)
            try:
                await other.execute(f"SELECT pg_notify('{NOTIFY_CHANNEL}', 'ab:1')")
            finally:
                await other.close()

        _blocking(notify)
        time.sleep(0.05)  # noqa: ASYNC251 - blocking on purpose: the notification is in the socket, unread
        assert not heard, "the driver read it already: this test proves nothing"
        assert probe()
    finally:
        await connection.close()
