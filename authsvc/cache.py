"""The per-process cache of key grants, kept correct by database notifications.

Correctness rules (a missed notification must never let a revoked key in):

* Entries are served only while the cache is *synchronised*: the listener
  holds a LISTEN connection and has heard from the database within
  ``freshness`` seconds. Otherwise every lookup reads through to the store.
* Going out of sync drops every entry; coming back in sync drops them again,
  because notifications may have been missed in between.
* A read-through result is stored only if no invalidation happened while it
  was being read (the ``epoch`` check). Otherwise a lookup that raced a
  revocation could put the pre-revocation record back after the eviction.
* A read-through result is stored only if it was read from the server whose
  notifications the cache follows (its *feed*, given by the listener at
  ``synchronised``). A row from any other server (a lagging standby, a
  former primary) may predate a revocation the feed has already announced.
* Freshness counts from when a heartbeat was *sent*: its reply proves that
  every notification committed before then has been delivered, nothing
  later. ``FRESHNESS`` bounds how long a missed revocation can be served.

Negative entries (``None``: no such key) are cached too, so a flood of
well-formed unknown keys does not reach the database; a create notification
evicts them. They live in their own, smaller LRU, so such a flood cannot
push real keys out. Expiry is not cached away: ``decide`` checks it on every hit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from authsvc.keys import KeyGrant

MISS: Final = object()
# Cached decisions are served at most this long after the last proof that
# the feed is alive (the listener heartbeats well within it).
FRESHNESS: Final = 0.1


class KeyCache:
    def __init__(self, max_entries: int, freshness: float = FRESHNESS) -> None:
        self._entries: OrderedDict[bytes, KeyGrant] = OrderedDict()
        self._unknown: OrderedDict[bytes, None] = OrderedDict()
        self._max_entries = max_entries
        self._max_unknown = max_entries // 10 if max_entries else 0
        self._freshness = freshness
        self._fresh_until = 0.0
        self._synced = False
        self._feed: object = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._unknown)

    @property
    def serving(self) -> bool:
        return self._synced and time.monotonic() < self._fresh_until

    def get(self, digest: bytes) -> KeyGrant | object | None:
        if not self.serving:
            return MISS
        grant = self._entries.get(digest)
        if grant is not None:
            self._entries.move_to_end(digest)
            return grant
        if digest in self._unknown:
            self._unknown.move_to_end(digest)
            return None
        return MISS

    def put(self, digest: bytes, grant: KeyGrant | None, epoch: int, source: object = None) -> None:
        """Store a read-through result read while ``self.epoch == epoch``, from server ``source``."""
        if not self._synced or epoch != self.epoch or source is not self._feed:
            return
        if grant is None:
            self._unknown[digest] = None
            if len(self._unknown) > self._max_unknown:
                self._unknown.popitem(last=False)
        else:
            self._entries[digest] = grant
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, digest: bytes) -> None:
        self.epoch += 1
        self._entries.pop(digest, None)
        self._unknown.pop(digest, None)

    def clear(self) -> None:
        """Forget every entry; whether entries may be served is unchanged."""
        self.epoch += 1
        self._entries.clear()
        self._unknown.clear()

    def heard_from_store(self, sent_at: float | None = None) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic; default now) was answered.

        Every notification committed before ``sent_at`` has been delivered.
        """
        self._fresh_until = (time.monotonic() if sent_at is None else sent_at) + self._freshness

    def synchronised(self, feed: object = None, sent_at: float | None = None) -> None:
        """The listener is (again) subscribed, to server ``feed`` since ``sent_at``.

        Start from empty, missed notifications or not; only rows read from
        ``feed`` will be stored.
        """
        self.clear()
        self._feed = feed
        self._synced = True
        self.heard_from_store(sent_at)

    def desynchronised(self) -> None:
        self.clear()
        self._synced = False
        self._feed = None
