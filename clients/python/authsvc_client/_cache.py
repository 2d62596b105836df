"""The one decision cache: key digests to what Authorize knows of them, kept true by an invalidation feed.

authsvc's server caches key grants with it (fed by PostgreSQL's
LISTEN/NOTIFY), and a client process can cache decisions with it (fed by
authsvc's stream). The rules that make a cache safe for authorization are
here once, so neither side can get them wrong on its own:

* **Freshness.** Entries are served only while the cache is *synchronised*
  (its feed is subscribed) and has heard from its source within
  ``freshness`` seconds. Hearing means: the source answered a heartbeat that
  was *sent* at time ``t``, which proves every invalidation committed before
  ``t`` has been delivered; so ``alive(t)`` keeps entries good until
  ``t + freshness``. Otherwise every lookup goes to the source.
* **Resets.** Losing the feed drops every entry and stops serving;
  subscribing (again) drops them once more, because invalidations may have
  been missed in between.
* **One source.** A looked-up value is stored only if it was read from the
  source whose invalidations the cache follows (the ``source`` given to
  ``synchronised``, compared by identity). A value read elsewhere (a lagging
  standby, a former primary) may predate an invalidation already delivered.
* **Epochs.** A looked-up value is stored only if no invalidation arrived
  while it was being looked up (``epoch`` at the start of the lookup equals
  ``epoch`` now). Otherwise a lookup that raced a revocation could put the
  pre-revocation value back after the eviction.
* **Bounded negatives.** "No such key" is cached too, so a flood of
  well-formed unknown keys does not reach the source; negative entries live
  in their own LRU, a tenth of the size, so such a flood cannot push real
  keys out. A create's invalidation evicts them.

Nothing here checks expiry: a cached value records its expiry and the
caller's decision function checks it on every hit.

The clock is injected (monotonic seconds) so tests and the core stay free of
time; no I/O, no grpc.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, TypeVar

V = TypeVar("V")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


#: ``get`` found nothing it may serve: look the key up at the source.
MISS: Final = _Miss()


def _always() -> bool:
    return True


class DecisionCache(Generic[V]):
    """An LRU of positive entries (``V``) and a smaller one of negative ones (``None``), by key digest.

    It is also the subscriber of its invalidation feed: ``evict``, ``clear``,
    ``alive``, ``synchronised`` and ``desynchronised`` are what a feed calls.
    """

    def __init__(self, max_entries: int, freshness: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[bytes, V] = OrderedDict()
        self._unknown: OrderedDict[bytes, None] = OrderedDict()
        self._max_entries = max_entries
        self._max_unknown = max_entries // 10 if max_entries else 0
        self._freshness = freshness
        self._clock = clock
        self._fresh_until = 0.0
        self._synced = False
        self._source: object = None
        self._alive: Callable[[], bool] = _always
        #: Bumped by every invalidation; see ``put``.
        self.epoch = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._unknown)

    @property
    def serving(self) -> bool:
        return self._synced and self._clock() < self._fresh_until and self._alive()

    def get(self, digest: bytes) -> V | _Miss | None:
        """The cached value, ``None`` for a cached "no such key", or ``MISS``."""
        if self._synced and self._clock() < self._fresh_until and self._alive():
            value = self._entries.get(digest)
            if value is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
                return value
            if digest in self._unknown:
                self._unknown.move_to_end(digest)
                self.hits += 1
                return None
        self.misses += 1
        return MISS

    def peek(self, digest: bytes) -> V | _Miss | None:
        """Like ``get`` (only while serving), but neither counted nor moved in the LRU: for callers that inspect."""
        if self._synced and self._clock() < self._fresh_until:
            value = self._entries.get(digest)
            if value is not None:
                return value
            if digest in self._unknown:
                return None
        return MISS

    def put(self, digest: bytes, value: V | None, epoch: int, source: object = None) -> None:
        """Store a looked-up value (``None``: no such key) read from ``source`` while ``self.epoch == epoch``."""
        if not self._synced or epoch != self.epoch or source is not self._source:
            return
        if value is None:
            self._unknown[digest] = None
            if len(self._unknown) > self._max_unknown:
                self._unknown.popitem(last=False)
        else:
            self._entries[digest] = value
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    # -- what the feed calls --------------------------------------------------

    def evict(self, digest: bytes) -> None:
        """The answer for this key may have changed (created, revoked, ...)."""
        self.epoch += 1
        self._entries.pop(digest, None)
        self._unknown.pop(digest, None)

    def clear(self) -> None:
        """Forget every entry; whether entries may be served is unchanged."""
        self.epoch += 1
        self._entries.clear()
        self._unknown.clear()

    def alive(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (this cache's clock) was answered: all invalidations before it arrived."""
        until = sent_at + self._freshness
        if until > self._fresh_until:
            self._fresh_until = until

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        """The feed is (again) subscribed to ``source`` as of ``at``: start from empty, missed invalidations or not.

        From now on only values read from ``source`` are stored. ``alive``
        says, without waiting for the event loop, whether the feed's
        connection is still open: a driver reports a closed connection only
        once the loop has run its read callback, and a request read before
        that (answered synchronously on a hit) must not be answered from a
        cache whose feed is gone.
        """
        self.clear()
        self._source = source
        self._alive = alive or _always
        self._synced = True
        self._fresh_until = at + self._freshness

    def desynchronised(self) -> None:
        """The feed is lost: drop everything and serve nothing until it is back."""
        self.clear()
        self._synced = False
        self._source = None
        self._alive = _always
        self._fresh_until = 0.0
