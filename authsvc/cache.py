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

Negative entries (``None``: no such key) are cached too, so a flood of
well-formed unknown keys does not reach the database; a create notification
evicts them. They live in their own, smaller LRU, so such a flood cannot
push real keys out. Expiry is not cached away: ``decide`` checks it on every hit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from authsvc.keys import KeyGrant

MISS: Final = object()


def _always() -> bool:
    return True


class KeyCache:
    def __init__(self, max_entries: int, freshness: float = 1.0) -> None:
        self._entries: OrderedDict[bytes, KeyGrant] = OrderedDict()
        self._unknown: OrderedDict[bytes, None] = OrderedDict()
        self._max_entries = max_entries
        self._max_unknown = max_entries // 10 if max_entries else 0
        self._freshness = freshness
        self._fresh_until = 0.0
        self._synced = False
        self._alive: Callable[[], bool] = _always
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._unknown)

    @property
    def serving(self) -> bool:
        return self._synced and time.monotonic() < self._fresh_until and self._alive()

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

    def put(self, digest: bytes, grant: KeyGrant | None, epoch: int) -> None:
        """Store a read-through result that was read while ``self.epoch == epoch``."""
        if not self._synced or epoch != self.epoch:
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

    def heard_from_store(self) -> None:
        """The listener proved its connection alive; notifications up to now were delivered."""
        self._fresh_until = time.monotonic() + self._freshness

    def synchronised(self, alive: Callable[[], bool] | None = None) -> None:
        """The listener is (again) subscribed: start from empty, missed notifications or not.

        ``alive`` says, without waiting for the event loop, whether the
        listener's connection is still open. The driver reports a closed
        connection two loop turns after its EOF, and a request read in the
        same turn (answered synchronously on a hit) must not be answered from
        a cache whose feed is gone.
        """
        self.clear()
        self._synced = True
        self._alive = alive or _always
        self.heard_from_store()

    def desynchronised(self) -> None:
        self.clear()
        self._synced = False
        self._alive = _always
