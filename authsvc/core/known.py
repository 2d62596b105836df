"""Which key digests the store holds: how a flood of forged keys is told from real keys before any lookup.

A forged key with a valid checksum is as well-formed as a real one, so
without more it costs a store lookup, and a flood of them takes the lookup
capacity that uncached real keys need. This process therefore keeps the
first four bytes of every stored digest (4 bytes a key: 4 MB for a million
keys), loaded page by page from the store once its invalidation feed is
subscribed, and kept current by that feed: every write that can change an
answer, a creation included, publishes its digest, and each one is added.

The table is a priority, never a decision:

* a digest whose prefix is in the table (or any digest while the table is
  not loaded) is looked up as before;
* a digest whose prefix is not (a *suspect*: unknown when the feed last
  spoke, or created since, on another replica, ms ago) is looked up too,
  but only within ``SuspectBudget``'s rate; past it, it is refused at once
  as ``AtCapacity`` (UNAVAILABLE, retryable), never denied. A key created a
  moment ago whose notification has not arrived yet is so at worst refused
  once during a flood, and allowed on retry: by then the feed added it.

Four bytes, not 32: a forged digest matches some stored prefix with
probability n / 2**32 (0.02% for a million keys) and is then merely looked
up. Loading starts over on every (re)subscription of the feed, since
changes may have been missed before it; until it is done nothing is
suspect. LISTEN comes before the load's first page, so a key is either in a
page or in a notification, or both.

No I/O here: the store is a port, the loop is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from bisect import bisect_left
from collections.abc import Callable

from authsvc.core.ports import KeyStore, Monotonic

log = logging.getLogger(__name__)

#: Digests a load asks the store for at once: a page of 20,000 decodes in a few ms of the event loop.
PAGE = 20_000
#: Suspects looked up per second by one process, and the burst it may take at once.
SUSPECT_RATE = 50.0
SUSPECT_BURST = 20.0
# How long a failed load waits before it tries again (the store was unreachable).
_RETRY_SECONDS = 1.0
# Published digests kept apart from the loaded table before a fresh load compacts them (or an eighth of it).
_MIN_ADDED = 65_536


class KnownDigests:
    """The prefixes of every stored digest, as of this process's feed; subscribe it to that feed.

    ``suspect`` is the hot path's only call. The ``FeedSubscriber`` methods
    add published digests and mark the table for a reload whenever the feed
    may have missed something; ``run`` does the loads. Published digests go
    to a set beside the sorted array, so a key change never moves the array;
    when the set grows large, a fresh load folds it in.
    """

    def __init__(self, store: KeyStore, clock: Monotonic, *, page: int = PAGE,
                 rate: float = SUSPECT_RATE, burst: float = SUSPECT_BURST) -> None:
        self._store = store
        self._clock = clock
        self._page = page
        #: How many suspects may be looked up; ``Authorizer.complete`` refuses the rest.
        self.budget = SuspectBudget(clock, rate, burst)
        # ``array('I')`` holds 4-byte unsigned ints on every platform CPython builds for.
        self._prefixes = array("I")
        assert self._prefixes.itemsize == 4
        #: Published since the table's last load began: a set, so that no key change moves the array.
        self._added: set[int] = set()
        #: While a load runs: what it may not see, kept for when it is done (see ``run``).
        self._during: set[int] | None = None
        self.ready = False
        self._generation = 0
        self._wanted = asyncio.Event()

    def __len__(self) -> int:
        return len(self._prefixes) + len(self._added)

    def suspect(self, digest: bytes) -> bool:
        """True when the table is loaded and ``digest``'s prefix is not in it (see the module docstring)."""
        if not self.ready:
            return False
        prefixes = self._prefixes
        p = int.from_bytes(digest[:4], "big")
        i = bisect_left(prefixes, p)
        return (i == len(prefixes) or prefixes[i] != p) and p not in self._added

    def add(self, digest: bytes) -> None:
        """``digest`` is (or may now be) stored: never a suspect again."""
        p = int.from_bytes(digest[:4], "big")
        added = self._added
        added.add(p)
        if self._during is not None:
            self._during.add(p)
        # Bounded even if something floods the channel with digests: a fresh load drops what is not stored.
        if len(added) > max(_MIN_ADDED, len(self._prefixes) // 8):
            self._wanted.set()

    # -- what the feed calls --------------------------------------------------

    def evict(self, digest: bytes) -> None:
        self.add(digest)

    def clear(self) -> None:
        """An unreadable notification: which digest it named is unknown, so load everything again."""
        self._reload()

    def alive(self, sent_at: float) -> None:
        """Freshness does not matter here: the table only ever sends a lookup the slower way."""

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        self._reload()

    def desynchronised(self) -> None:
        """Nothing is suspect until the feed is back and a load has finished after it."""
        self._generation += 1
        self.ready = False
        self._added = set()

    def _reload(self) -> None:
        self.desynchronised()
        self._wanted.set()

    # -- loading ----------------------------------------------------------------

    async def run(self) -> None:
        """Load whenever asked (by the feed, or by a grown ``_added``), until cancelled.

        A load after a (re)subscription makes the table ready; one that only
        compacts ``_added`` runs while the table keeps serving.
        """
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            generation = self._generation
            started = self._clock()
            # A first load keeps all that was published since the subscription; a compaction only
            # what comes after its start: anything older that the pages lack is not stored.
            during = self._during = set(self._added) if not self.ready else set()
            try:
                loaded = await self._load(generation)
            except Exception as exc:  # the store's errors are ``Unavailable``; whatever it is, try again later
                self._during = None
                log.warning("loading the stored key digests failed (%s); retrying in %gs",
                            type(exc).__name__, _RETRY_SECONDS)
                await asyncio.sleep(_RETRY_SECONDS)
                if generation == self._generation:
                    self._wanted.set()
                continue
            self._during = None
            if loaded is None:
                continue  # the feed resubscribed meanwhile; ``_wanted`` is set again
            # What was published meanwhile may be newer than the pages: keep what they lack.
            self._added = {p for p in during if not _holds(loaded, p)}
            self._prefixes, self.ready = loaded, True
            log.info("loaded %d stored key digests in %.2fs", len(loaded), self._clock() - started)

    async def _load(self, generation: int) -> array[int] | None:
        prefixes = array("I")
        after = b""
        while generation == self._generation:
            digests = await self._store.key_digests(after, self._page)
            prefixes.extend([int.from_bytes(d[:4], "big") for d in digests])
            if len(digests) < self._page:
                return prefixes if generation == self._generation else None
            after = digests[-1]
        return None


def _holds(prefixes: array[int], p: int) -> bool:
    i = bisect_left(prefixes, p)
    return i < len(prefixes) and prefixes[i] == p


class SuspectBudget:
    """A token bucket: how many suspects one process looks up per second (``rate``), ``burst`` at once."""

    def __init__(self, clock: Monotonic, rate: float = SUSPECT_RATE, burst: float = SUSPECT_BURST) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = clock()

    def try_take(self) -> bool:
        now = self._clock()
        tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
