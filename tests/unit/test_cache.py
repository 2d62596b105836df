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
    cache = KeyCache(size, freshness=60.0)  # timing is not what these tests are about
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


def test_rows_read_from_a_server_other_than_the_feeds_are_not_stored() -> None:
    """A lagging standby or a former primary may still hold a row the feed has announced as revoked."""
    feed, other = object(), object()
    cache = KeyCache(10, freshness=60.0)
    cache.synchronised(feed)
    cache.put(D1, GRANT, cache.epoch, other)
    cache.put(D2, None, cache.epoch, other)
    assert cache.get(D1) is MISS
    assert cache.get(D2) is MISS
    cache.put(D1, GRANT, cache.epoch, feed)
    assert cache.get(D1) is GRANT


def test_a_new_feed_starts_from_empty_and_refuses_the_old_feeds_rows() -> None:
    """A failover: the listener follows another server; nothing from before is served or stored."""
    old, new = object(), object()
    cache = KeyCache(10, freshness=60.0)
    cache.synchronised(old)
    cache.put(D1, GRANT, cache.epoch, old)
    cache.synchronised(new)
    assert cache.get(D1) is MISS
    cache.put(D1, GRANT, cache.epoch, old)
    assert cache.get(D1) is MISS


def test_freshness_counts_from_when_the_heartbeat_was_sent() -> None:
    """A reply only proves what was committed before its query left; a slow reply earns no extra time."""
    cache = KeyCache(10)
    cache.synchronised()
    cache.put(D1, GRANT, cache.epoch)
    cache.heard_from_store(sent_at=time.monotonic() - 0.1)  # sent 100 ms ago, answered just now
    assert cache.get(D1) is MISS
    cache.heard_from_store(sent_at=time.monotonic())
    assert cache.get(D1) is GRANT


def test_the_default_freshness_bound_is_at_most_100_ms() -> None:
    cache = KeyCache(10)
    cache.synchronised()
    cache.put(D1, GRANT, cache.epoch)
    time.sleep(0.11)
    assert cache.get(D1) is MISS
