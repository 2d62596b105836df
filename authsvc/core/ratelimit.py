"""Per-key rate limits: fixed windows, shared through Redis when configured.

A key's limit is its own (set at CreateKey) or the deployment default; 0
means unlimited. Every request in a window increments the key's counter, so
across any number of processes sharing Redis exactly ``limit`` requests are
admitted per window.

Without Redis, or while Redis fails, each process counts locally. Rate
limiting must never take authorization down: a Redis error is logged and
counted, and the request is judged by the local counter instead.

A circuit breaker keeps a hung Redis from costing every call its timeout:
after a failure Redis is not asked at all for ``breaker_seconds`` (local
counters at once); then one call probes it, and the breaker closes when
the probe answers (or stays open another period when it fails). Calls
arriving while the probe is out count locally rather than queue behind it.
"""

from __future__ import annotations

import logging
import math

from authsvc.core.keys import Decision, RateLimit, Reason
from authsvc.core.ports import Monotonic, SharedCounter

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(
        self,
        default_limit: int,
        window_seconds: int,
        shared: SharedCounter | None = None,
        *,
        monotonic: Monotonic,
        breaker_seconds: float = 1.0,
    ) -> None:
        self.default_limit = default_limit
        self.window = window_seconds
        self.shared = shared
        self.shared_failures = 0
        self._monotonic = monotonic
        self._last_failure_log = float("-inf")
        self._local: dict[str, int] = {}
        self._local_window = -1
        self.breaker_seconds = breaker_seconds
        self._open_until = float("-inf")  # the breaker is open (Redis skipped) until this monotonic time
        self._probing = False

    async def apply(self, decision: Decision, key_limit: int, now: float) -> Decision:
        """Turn an allowed decision into RATE_LIMITED once the key is over its limit."""
        limit = key_limit or self.default_limit
        if limit <= 0 or decision.principal is None:
            return decision
        window_index = int(now // self.window)
        reset = max(1, math.ceil((window_index + 1) * self.window - now))
        key_id = decision.principal.key_id
        count = await self._count(key_id, window_index)
        status = RateLimit(limit=limit, remaining=max(0, limit - count), reset_seconds=reset)
        reason = Reason.OK if count <= limit else Reason.RATE_LIMITED
        return Decision(reason, decision.principal, status)

    async def hit(self, name: str, now: float) -> tuple[bool, int]:
        """Count one event for ``name`` (not a key) against the default limit: (within it, seconds to reset)."""
        window_index = int(now // self.window)
        count = await self._count(name, window_index)
        return count <= self.default_limit, max(1, math.ceil((window_index + 1) * self.window - now))

    async def _count(self, key_id: str, window_index: int) -> int:
        if self.shared is not None and self._may_ask_redis():
            probe = self._open_until != float("-inf")
            self._probing = probe
            try:
                count = await self.shared.incr(f"authsvc:rl:{key_id}:{window_index}", self.window + 1)
            except Exception as exc:  # any Redis failure: fall back, never fail the request
                self.shared_failures += 1
                now = self._monotonic()
                self._open_until = now + self.breaker_seconds
                if now - self._last_failure_log > 10:
                    self._last_failure_log = now
                    log.warning(
                        "rate limiting falls back to local counters: Redis failed (%s; %d failures so far)",
                        type(exc).__name__,
                        self.shared_failures,
                    )
            else:
                self._open_until = float("-inf")  # Redis answered: the breaker is closed
                return count
            finally:
                if probe:
                    self._probing = False
        return self._count_locally(key_id, window_index)

    @property
    def breaker_open(self) -> bool:
        """Whether Redis is being skipped right now (after a failure, for ``breaker_seconds``)."""
        return self._open_until != float("-inf")

    def _may_ask_redis(self) -> bool:
        if self._open_until == float("-inf"):
            return True
        # Open: nobody asks until the period is over, then only one probe at a time.
        return not self._probing and self._monotonic() >= self._open_until

    def _count_locally(self, key_id: str, window_index: int) -> int:
        if window_index != self._local_window:
            # Windows are aligned for every key, so a new window starts everyone
            # from zero: memory is bounded by the keys seen in one window.
            self._local = {}
            self._local_window = window_index
        count = self._local.get(key_id, 0) + 1
        self._local[key_id] = count
        return count
