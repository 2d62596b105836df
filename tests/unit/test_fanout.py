"""The per-process fan-out to client streams: bounded queues, heartbeats only while fresh, resets."""

from __future__ import annotations

import asyncio

from authsvc.core.fanout import Fanout, Signal


async def test_a_new_watcher_starts_with_a_reset_then_gets_digests_in_feed_order() -> None:
    fanout = Fanout(lambda: True)
    watcher = fanout.watch()
    fanout.evict(b"a")
    fanout.evict(b"b")
    assert await watcher.next_batch() == [Signal.RESET]
    assert await watcher.next_batch() == [b"a", b"b"]


async def test_heartbeats_are_queued_only_while_the_processes_own_cache_is_serving() -> None:
    serving = False
    fanout = Fanout(lambda: serving)
    watcher = fanout.watch()
    assert await watcher.next_batch() == [Signal.RESET]
    fanout.tick()
    fanout.evict(b"x")
    assert await watcher.next_batch() == [b"x"]  # no heartbeat came before it
    serving = True
    fanout.tick()
    fanout.tick()  # coalesced: an idle slow client does not grow its queue
    assert await watcher.next_batch() == [Signal.HEARTBEAT]
    assert not watcher._queue


async def test_losing_or_regaining_the_feed_resets_every_watcher_and_drops_what_was_queued() -> None:
    fanout = Fanout(lambda: True)
    watchers = [fanout.watch() for _ in range(3)]
    fanout.evict(b"x")
    fanout.desynchronised()
    fanout.synchronised(0.0)
    for watcher in watchers:
        assert await watcher.next_batch() == [Signal.RESET]
        assert not watcher._queue


async def test_a_watcher_past_its_bound_is_dropped_and_forgotten_and_a_new_one_starts_from_a_reset() -> None:
    fanout = Fanout(lambda: True, max_queue=100)
    slow = fanout.watch()
    for i in range(101):
        fanout.evict(i.to_bytes(4, "big"))
    assert slow.dropped and not slow._queue  # its memory is freed at once
    assert await asyncio.wait_for(slow.next_batch(), 1) == []  # its transport ends the stream
    fanout.tick()
    assert len(fanout) == 0 and fanout.dropped == 1
    again = fanout.watch()
    assert await again.next_batch() == [Signal.RESET]


async def test_batches_hold_at_most_the_given_number_of_digests() -> None:
    fanout = Fanout(lambda: True)
    watcher = fanout.watch()
    await watcher.next_batch()
    for i in range(2500):
        fanout.evict(i.to_bytes(4, "big"))
    sizes = [len(await watcher.next_batch()) for _ in range(3)]
    assert sizes == [1000, 1000, 500]
