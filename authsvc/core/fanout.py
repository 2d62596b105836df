"""One server process's invalidation feed, fanned out to every client cache that watches it.

The fan-out is a second subscriber of the process's feed, next to the
process's own decision cache (subscribed after it, so a client never hears
of an invalidation before this process's cache has applied it). Each
watching client gets a bounded queue of events:

* digests to evict, in the feed's order;
* a heartbeat every ``heartbeat`` seconds, queued only while this process's
  own cache is serving: its feed is subscribed and fresh, so every
  invalidation committed before the heartbeat is already queued ahead of it;
* a reset whenever the feed was lost or subscribed again (invalidations may
  have been missed: the client must drop everything).

Memory stays bounded: a watcher whose queue grows past ``max_queue`` events
(or whose transport cannot deliver one for ``STALL_SECONDS``) is dropped;
its client reconnects and starts again from an empty cache. Heartbeats and
resets are coalesced, so an idle but slow client does not grow its queue.

No grpc here: the gRPC adapter (``authsvc.grpc.watch``) turns events into
messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable

#: Heartbeats to clients at least every 200 ms; half of it leaves room for a loaded machine.
HEARTBEAT_SECONDS = 0.1
MAX_QUEUE = 10_000
STALL_SECONDS = 2.0


class Signal(enum.Enum):
    HEARTBEAT = "heartbeat"
    RESET = "reset"


#: A queued event: a digest to evict, or a signal.
Event = bytes | Signal


class Watcher:
    """One client stream's queue; ``next_batch`` is what its transport sends next."""

    def __init__(self, max_queue: int) -> None:
        self._queue: deque[Event] = deque()
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        #: Why this watcher was dropped ("" while it is not).
        self.dropped = ""

    def push(self, event: Event) -> None:
        if self.dropped:
            return
        queue = self._queue
        if isinstance(event, Signal) and queue and queue[-1] is event:
            return  # two heartbeats (or resets) in a row say no more than one
        if event is Signal.RESET:
            # Everything queued before a reset is moot: the client drops its cache anyway.
            queue.clear()
        queue.append(event)
        if len(queue) > self._max_queue:
            self.drop(f"more than {self._max_queue} events queued")
        self._wake.set()

    def drop(self, why: str) -> None:
        self.dropped = why
        self._queue.clear()
        self._wake.set()

    async def next_batch(self, max_digests: int = 1000) -> list[Event]:
        """Waits for events: a run of digests (at most ``max_digests``) or one signal.

        Returns ``[]`` once the watcher is dropped.
        """
        while not self._queue and not self.dropped:
            self._wake.clear()
            await self._wake.wait()
        if self.dropped:
            return []
        queue = self._queue
        if isinstance(queue[0], Signal):
            return [queue.popleft()]
        batch: list[Event] = []
        while queue and not isinstance(queue[0], Signal) and len(batch) < max_digests:
            batch.append(queue.popleft())
        return batch


class Fanout:
    """A ``FeedSubscriber`` that queues the feed's news for every watching client; see the module docstring."""

    def __init__(
        self,
        serving: Callable[[], bool],
        *,
        heartbeat: float = HEARTBEAT_SECONDS,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self._serving = serving
        self._heartbeat = heartbeat
        self._max_queue = max_queue
        self._watchers: set[Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._watchers)

    def watch(self) -> Watcher:
        """A new client stream; it starts with a reset, so its client starts from empty."""
        watcher = Watcher(self._max_queue)
        watcher.push(Signal.RESET)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    # -- what the feed calls --------------------------------------------------

    def evict(self, digest: bytes) -> None:
        for watcher in self._watchers:
            watcher.push(digest)

    def clear(self) -> None:
        self._reset()

    def alive(self, sent_at: float) -> None:
        """Nothing to do: heartbeats to clients follow this process's cache (``serving``)."""

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        self._reset()

    def desynchronised(self) -> None:
        self._reset()

    def _reset(self) -> None:
        for watcher in self._watchers:
            watcher.push(Signal.RESET)

    # -- heartbeats and the stall bound ----------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authsvc-fanout-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.drop_all("the server is stopping")

    def drop_all(self, why: str) -> None:
        """End every client stream; each client resynchronises from empty."""
        for watcher in list(self._watchers):
            watcher.drop(why)

    def tick(self) -> None:
        """One heartbeat round: forget dropped watchers, and queue a heartbeat if this process's cache is serving."""
        beat = self._serving()
        for watcher in list(self._watchers):
            if watcher.dropped:
                self.dropped += 1
                self._watchers.discard(watcher)
            elif beat:
                watcher.push(Signal.HEARTBEAT)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            self.tick()
