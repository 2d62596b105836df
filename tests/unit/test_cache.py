"""The cache's safety rules (issue 4): never serve what a missed notification could have changed."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from authsvc.cache import MISS, KeyCache
from authsvc.keys import ApiKey, KeyGrant, ScopeCatalog

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


def synced(size: int = 10) -> KeyCache:
    cache = KeyCache(size)
    cache.synchronised()
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
    cache = KeyCache(10)
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS


def test_losing_the_listener_drops_and_stops_serving() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    cache.desynchronised()
    assert cache.get(D1) is MISS
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is MISS
    cache.synchronised()
    assert cache.get(D1) is MISS  # resynchronised from empty: missed notifications cannot matter


def test_a_read_that_raced_an_invalidation_is_not_stored() -> None:
    cache = synced()
    epoch = cache.epoch  # lookup starts
    cache.invalidate(D2)  # a revocation lands while it reads
    cache.put(D1, GRANT, epoch)
    assert cache.get(D1) is MISS


def test_invalidate_evicts() -> None:
    cache = synced()
    cache.put(D1, GRANT, cache.epoch)
    cache.invalidate(D1)
    assert cache.get(D1) is MISS


def test_stale_heartbeat_stops_serving() -> None:
    cache = KeyCache(10, freshness=0.01)
    cache.synchronised()
    cache.put(D1, GRANT, cache.epoch)
    time.sleep(0.02)
    assert cache.get(D1) is MISS
    cache.heard_from_store()
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
    cache = KeyCache(10)
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


def test_a_closed_listener_connection_stops_serving_before_the_driver_reports_it() -> None:
    """The probe is read on every hit: a closed socket stops cached answers in the very loop turn it is seen."""
    open_ = [True]
    cache = KeyCache(10)
    cache.synchronised(alive=lambda: open_[0])
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is GRANT
    open_[0] = False
    assert cache.get(D1) is MISS
    assert not cache.serving
    cache.desynchronised()
    cache.synchronised()  # a new subscription without a probe: served on the heartbeat rules alone
    cache.put(D1, GRANT, cache.epoch)
    assert cache.get(D1) is GRANT


async def test_the_listener_probe_sees_its_connection_closed_at_once(database_url: str) -> None:
    """Against a real connection: the probe turns false as soon as the socket is closed, no loop turn needed."""
    import asyncpg

    from authsvc.invalidation import _open_probe

    connection = await asyncpg.connect(database_url)
    probe = _open_probe(connection)
    assert probe is not None, "asyncpg no longer exposes its transport: the cache is back to is_closed() alone"
    assert probe()
    connection.terminate()  # closes the transport synchronously, as reading EOF does
    assert not probe()
