"""The client's decision cache: what authsvc answered, decided again locally while authsvc's stream says it holds.

Built on the one ``DecisionCache`` (``_cache``) and the one ``decide``
(``_decision``), so a client applies the server's rules and the server's
cache-safety rules; what is particular to a client is here:

* **What is kept.** Only answers authsvc marked ``cacheable`` (never a key
  under a rate limit, never a missing or malformed key): the key's
  principal, effective scopes and expiry, or "no such key" (in the bounded
  negative part). Any required scope is then decided with ``decide``; expiry
  is checked on every hit against the wall clock.
* **Scopes.** A scope is decided locally only once authsvc has accepted it
  in a call: an unknown scope stays authsvc's ``INVALID_ARGUMENT``.
* **Freshness.** Entries are served only while the stream is subscribed and
  authsvc was heard from within ``FRESHNESS`` seconds (a heartbeat, sent by
  authsvc only while its own feed is fresh). A reset, a lost stream or a
  reconnect drops everything; the cache starts empty on the next heartbeat.
* **Epochs.** ``begin()`` is read before the Authorize call is sent and
  given back to ``learn``: an answer requested before an invalidation
  arrived is not kept after it.
* **Usage.** Locally decided calls are tallied per key id (calls by reason,
  last use) and drained into the stream's reports.

Thread safe (one lock), because the blocking ``Client`` runs its stream on a
thread. The key itself is never stored: entries are keyed by its SHA-256.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from authsvc_client._cache import MISS, DecisionCache
from authsvc_client._decision import Decision, Grant, Reason, decide

#: Seconds an entry may be served after authsvc was last heard from.
FRESHNESS = 1.0
#: Distinct scopes remembered as accepted by authsvc (a catalog is small).
MAX_SCOPES = 1_000
#: Keys with usage waiting for the next report; past it, the oldest report is lost rather than memory grown.
MAX_USAGE_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class CacheStats:
    """For operators and tests: ``client.cache_stats()``."""

    hits: int
    misses: int
    entries: int
    #: ``"off"``, ``"connecting"``, ``"subscribed"`` (heard from within the bound) or ``"stale"``.
    stream: str
    #: Times the stream was (re)connected.
    connects: int
    #: Resets received from authsvc.
    resets: int


class LocalCache:
    def __init__(
        self,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        freshness: float = FRESHNESS,
    ) -> None:
        self._cache: DecisionCache[Grant] = DecisionCache(max_entries, freshness, clock)
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._scopes: set[str] = set()
        self._synced = False
        self._connected = False
        #: key id -> (its last local call, calls by reason, its digest: the report's proof of holding it).
        self._usage: dict[str, tuple[float, dict[int, int], bytes]] = {}
        self.connects = 0
        self.resets = 0

    # -- the call path ---------------------------------------------------------

    def lookup(self, key: str, scope: str) -> Decision | None:
        """The local decision, or ``None``: ask authsvc."""
        if scope and scope not in self._scopes:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            found = self._cache.get(digest)
            if found is MISS:
                return None
            now = self._wall()
            decision = decide(found, scope, now)  # type: ignore[arg-type]  # MISS ruled out
            if found is not None:
                self._tally(found.principal.key_id, digest, decision.reason, now)  # type: ignore[union-attr]
            return decision

    def begin(self) -> int:
        """The epoch to give ``learn`` for the call about to be sent."""
        return self._cache.epoch

    def learn(
        self, key: str, scope: str, decision: Decision, expire_at: float | None, cacheable: bool, epoch: int
    ) -> None:
        """Keep what authsvc answered, if it may be kept and nothing was invalidated since ``begin``."""
        if scope and len(self._scopes) < MAX_SCOPES:
            self._scopes.add(scope)  # authsvc answered, so it knows this scope
        if not cacheable or decision.rate_limit is not None:
            return
        principal = decision.principal
        if principal is None:
            if decision.reason is not Reason.UNKNOWN_KEY:
                return
            grant: Grant | None = None
        else:
            grant = Grant(
                principal=principal,
                effective_scopes=frozenset(principal.scopes),
                expire_at=expire_at,
                revoked=decision.reason is Reason.REVOKED,
                rate_limit=0,
                allow=Decision(Reason.OK, principal),
            )
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            self._cache.put(digest, grant, epoch)

    # -- what the stream calls ---------------------------------------------------

    def connecting(self) -> None:
        with self._lock:
            self._connected = True
            self.connects += 1
            self._drop()

    def lost(self) -> None:
        with self._lock:
            self._connected = False
            self._drop()

    def reset(self) -> None:
        with self._lock:
            self.resets += 1
            self._drop()

    def heartbeat(self) -> None:
        with self._lock:
            now = self._clock()
            if not self._synced:
                self._cache.synchronised(now)  # from empty: whatever came before a reset is gone
                self._synced = True
            else:
                self._cache.alive(now)

    def evict(self, digests: list[bytes]) -> None:
        with self._lock:
            for digest in digests:
                self._cache.evict(digest)

    def _drop(self) -> None:
        self._cache.desynchronised()
        self._synced = False

    # -- usage reports -------------------------------------------------------------

    def _tally(self, key_id: str, digest: bytes, reason: Reason, now: float) -> None:
        usage = self._usage
        entry = usage.get(key_id)
        if entry is None:
            if len(usage) >= MAX_USAGE_KEYS:
                return
            entry = usage[key_id] = (now, {}, digest)
        elif entry[0] < now:
            entry = usage[key_id] = (now, entry[1], digest)
        counts = entry[1]
        counts[reason] = counts.get(reason, 0) + 1

    def drain_usage(self) -> dict[str, tuple[float, dict[int, int], bytes]]:
        with self._lock:
            usage, self._usage = self._usage, {}
            return usage

    def stats(self) -> CacheStats:
        with self._lock:
            if not self._connected:
                stream = "connecting" if self.connects == 0 else "lost"
            elif self._cache.serving:
                stream = "subscribed"
            else:
                stream = "stale"
            return CacheStats(
                self._cache.hits, self._cache.misses, len(self._cache), stream, self.connects, self.resets
            )
