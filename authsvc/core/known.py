"""Which key digests the store holds: how a flood of forged keys is told from real keys before any lookup.

A forged key with a valid checksum is as well-formed as a real one, so
without more it costs a store lookup, and a flood of them takes the lookup
capacity (and the database's CPU, shared by every replica) that uncached
real keys need. This process therefore keeps the first four bytes of every
stored digest (4 bytes a key: 4 MB for a million keys), loaded page by page
(each page one packed bytes value, so no per-key work in Python) from the
store once its invalidation feed is subscribed, and kept current by that
feed: every write that can change an answer, a creation included, publishes
its digest, and each one is added, as is every key this process creates
itself.

The table is a priority, never a decision:

* a digest whose prefix is in the table (or any digest before the first load)
  is looked up as before;
* a digest whose prefix is not (a *suspect*: unknown when the table was last
  loaded or told, or created since, on another replica, a moment ago) is
  looked up too, but only within its ``TokenBucket``'s rate; past it, it is
  refused at once (``OverUnknownKeyBudget``: UNAVAILABLE, retryable), never
  denied. A key created a moment ago elsewhere whose notification has not
  arrived yet is so refused during a flood until it arrives (milliseconds;
  while the feed is down, until it is back and the table has reloaded).

Since nothing here can deny or allow, the table keeps serving its last load
through a lost feed and while it reloads: turning it off would hand a flood
unbudgeted lookups exactly when the database is in trouble. Every
(re)subscription of the feed asks for a fresh load (changes may have been
missed before it), after a random delay so that a fleet does not scan the
table at the same moment; the feed's LISTEN comes before the load's first
page, so a key is either in a page or in a notification, or both. A load is
kept only if it finished under the subscription it was asked for and every
page came from the server that subscription follows.

Four bytes, not 32: a forged digest matches some stored prefix with
probability n / 2**32 (0.02% for a million keys) and is then merely looked
up.

No I/O here: the store is a port, the loop is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable

from authsvc.core.ports import PREFIX_BYTES, KeyStore, Monotonic

log = logging.getLogger(__name__)

#: Digests a load asks the store for at once: a page of 20,000 prefixes costs the event loop about 2 ms.
PAGE = 20_000
#: Suspects looked up per second by one process, and the burst it may take at once.
SUSPECT_RATE = 50.0
SUSPECT_BURST = 20.0
#: What a suspect refused past the budget is told (a refusal at capacity, retryable).
UNKNOWN_KEYS = "too many unknown keys are being tried; retry shortly"
#: Seconds a reload after a resubscription waits at most (uniformly at random) before it starts.
RELOAD_JITTER = 2.0
# Published digests kept beside the loaded table before a fresh load folds them in (or an eighth
# of the table), and past which more are ignored until it has (anyone who may NOTIFY can publish).
_MIN_ADDED = 65_536
_MAX_ADDED_FACTOR = 4
# At most one such compaction this often, so that a flood of notifications cannot keep a
# process scanning the table; and a failed load backs off from 1 s to this, with jitter.
_COMPACTION_INTERVAL = 10.0
_MAX_RETRY_SECONDS = 30.0
_LAST_PREFIX = 2 ** (8 * PREFIX_BYTES) - 1


class ElsewhereError(Exception):
    """A page came from another server than the one the feed follows (split brain, a failover under way)."""


def _prefix(digest: bytes) -> int:
    """The table's entry for a digest: its first four bytes, big-endian, so ints sort as bytea does."""
    return int.from_bytes(digest[:PREFIX_BYTES], "big")


def _holds(prefixes: array[int], p: int) -> bool:
    i = bisect_left(prefixes, p)
    return i < len(prefixes) and prefixes[i] == p


class KnownDigests:
    """The prefixes of every stored digest, as of this process's feed; subscribe it to that feed.

    ``suspect`` is the hot path's only call. ``add`` (the feed's ``evict``,
    and this process's own creations) puts a digest in a set beside the
    sorted array, so that no key change moves the array; ``run`` does the
    loads, which the feed's (re)subscriptions and a grown set ask for.
    """

    def __init__(
        self,
        store: KeyStore,
        clock: Monotonic,
        *,
        page: int = PAGE,
        rate: float = SUSPECT_RATE,
        burst: float = SUSPECT_BURST,
        jitter: float = RELOAD_JITTER,
    ) -> None:
        self._store = store
        self._clock = clock
        self._page = page
        self._jitter = jitter
        #: How many suspects may be looked up; ``Authorizer.complete`` refuses the rest.
        self.budget = TokenBucket(clock, rate, burst)
        # ``array('I')`` holds 4-byte unsigned ints on every platform CPython builds for.
        self._prefixes = array("I")
        assert self._prefixes.itemsize == PREFIX_BYTES
        #: Published, and not in ``_prefixes``.
        self._added: set[int] = set()
        #: Published since the pending load was asked for: what it may not see (``None``: no load pending).
        self._since: set[int] | None = None
        #: A load has finished: from then on the table serves, through feed losses and reloads.
        self.ready = False
        #: Loads finished so far (a log line each, too).
        self.loads = 0
        self._subscribed = False
        self._source: object = None
        #: Bumped by every (re)subscription and loss: a load asked for under another one is thrown away.
        self._generation = 0
        self._wanted = asyncio.Event()
        self._jitter_next = False
        self._compacted_at = -_COMPACTION_INTERVAL
        #: A failed load's progress, resumed by its retry: (generation, prefixes so far, the next page's start).
        self._partial: tuple[int, array[int], bytes] | None = None
        self._ignored = False

    def __len__(self) -> int:
        return len(self._prefixes) + len(self._added)

    def suspect(self, digest: bytes) -> bool:
        """True when a table is loaded and ``digest``'s prefix is in neither it nor what was published since."""
        if not self.ready:
            return False
        p = _prefix(digest)
        return not _holds(self._prefixes, p) and p not in self._added

    def add(self, digest: bytes) -> None:
        """``digest`` is (or may now be) stored: never a suspect again (up to the set's bound)."""
        p = _prefix(digest)
        if _holds(self._prefixes, p):
            return  # a revocation or an update of a loaded key: nothing new
        added = self._added
        bound = max(_MIN_ADDED, len(self._prefixes) // 8)
        if len(added) < bound * _MAX_ADDED_FACTOR:
            added.add(p)
            if self._since is not None:
                self._since.add(p)
        elif not self._ignored:
            self._ignored = True
            log.warning("more than %d key digests were published since the last load; ignoring more "
                        "until the next one (is something flooding the notification channel?)", len(added))
        # Capped or not, a grown set asks for the load that folds it in, as often as the interval allows.
        if len(added) > bound and self._since is None and self._subscribed:
            now = self._clock()
            if now - self._compacted_at >= _COMPACTION_INTERVAL:
                self._compacted_at = now
                self._request(jitter=False)

    # -- what the feed calls --------------------------------------------------

    def evict(self, digest: bytes) -> None:
        self.add(digest)

    def clear(self) -> None:
        """An unreadable notification: not authsvc's (it publishes hex digests only), so no creation. Ignored."""

    def alive(self, sent_at: float) -> None:
        """Freshness does not matter here: the table only ever sends a lookup the slower way."""

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        """Subscribed (again) to ``source``: changes may have been missed, so load afresh from that server."""
        self._subscribed = True
        self._source = source
        self._generation += 1
        self._since = set()
        self._request(jitter=self.ready)

    def desynchronised(self) -> None:
        """The feed is lost: a load under way is thrown away; the last one keeps serving (see the module docstring)."""
        self._subscribed = False
        self._source = None
        self._generation += 1
        self._since = None

    def _request(self, *, jitter: bool) -> None:
        self._jitter_next = jitter
        if self._since is None:
            self._since = set()
        self._wanted.set()

    # -- loading ----------------------------------------------------------------

    async def run(self) -> None:
        """Load whenever asked, until cancelled."""
        failures, failed_under = 0, -1
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if not self._subscribed:
                continue  # lost meanwhile: the next subscription asks again
            generation, source = self._generation, self._source
            if self._jitter_next and self._jitter > 0:
                await asyncio.sleep(random.uniform(0, self._jitter))  # noqa: S311  (spreading loads, not a secret)
                if generation != self._generation:
                    continue
            started = self._clock()
            try:
                loaded = await self._load(generation, source)
            except Exception as exc:  # the store's errors are ``Unavailable``; whatever it is, try again later
                failures = failures + 1 if failed_under == generation else 1
                failed_under = generation
                delay = min(_MAX_RETRY_SECONDS, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning("loading the stored key digests failed (%s); retrying in %.1fs", type(exc).__name__, delay)
                # A resubscription meanwhile asks for its own load at once: the back-off is this one's.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wanted.wait(), delay)
                if generation == self._generation:
                    self._jitter_next = False
                    self._wanted.set()
                continue
            failures = 0
            if loaded is None:
                continue  # resubscribed or lost meanwhile
            # What was published since the load was asked for may be newer than its pages: keep what
            # they lack. What was published before and is not in them is not stored: dropped.
            since = self._since if self._since is not None else set()
            self._added = {p for p in since if not _holds(loaded, p)}
            self._since = None
            self._prefixes, self.ready, self._ignored = loaded, True, False
            self.loads += 1
            log.info("loaded %d stored key digests in %.2fs", len(loaded), self._clock() - started)

    async def _load(self, generation: int, source: object) -> array[int] | None:
        partial = self._partial
        if partial is not None and partial[0] == generation:
            _, prefixes, start = partial  # a retry resumes where the failed page was
        else:
            prefixes, start = array("I"), b""
        self._partial = None
        while True:
            packed, read_from = await self._store.key_prefixes(start, self._page)
            if generation != self._generation:
                return None  # overtaken by a resubscription or a loss: not a failure, and nothing to resume
            if read_from is not source:
                raise ElsewhereError("a page came from another server than the feed follows")
            page = array("I")
            page.frombytes(packed)
            if sys.byteorder == "little":
                page.byteswap()  # the store's bytes are big-endian, as ``_prefix`` reads a digest
            # In C, and linear when the store kept its order (it need not): no per-key Python.
            page = array("I", sorted(page))
            prefixes.extend(page)
            if len(page) < self._page or page[-1] == _LAST_PREFIX:
                self._partial = None
                return prefixes
            # The next page starts past this one's last prefix: digests that share it add nothing.
            start = (page[-1] + 1).to_bytes(PREFIX_BYTES, "big")
            self._partial = (generation, prefixes, start)  # until the next page is read: what a retry resumes


class TokenBucket:
    """At most ``rate`` takes a second, ``burst`` at once: the suspects one process looks up, and the
    usage-report digests it checks (``authsvc.grpc.watch``)."""

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
