"""Per-key rate limits: fixed windows, shared through Redis when configured.

A key's limit is its own (set at CreateKey) or the deployment default; 0
means unlimited. Every request in a window increments the key's counter, so
across any number of processes sharing Redis exactly ``limit`` requests are
admitted per window.

Without Redis, or while Redis fails, each process counts locally. Rate
limiting must never take authorization down: a Redis error is logged and
counted, and the request is judged by the local counter instead.
"""

from __future__ import annotations

import logging
import math

from authsvc.core.keys import Decision, RateLimit, Reason
from authsvc.core.ports import Monotonic, SharedCounter

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(
        self, default_limit: int, window_seconds: int, shared: SharedCounter | None = None, *, monotonic: Monotonic
    ) -> None:
        self.default_limit = default_limit
        self.window = window_seconds
        self.shared = shared
        self.shared_failures = 0
        self._monotonic = monotonic
        self._last_failure_log = float("-inf")
        self._local: dict[str, int] = {}
        self._local_window = -1

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
        if self.shared is not None:
            try:
                return await self.shared.incr(f"authsvc:rl:{key_id}:{window_index}", self.window + 1)
            except Exception as exc:  # any Redis failure: fall back, never fail the request
                self.shared_failures += 1
                now = self._monotonic()
                if now - self._last_failure_log > 10:
                    self._last_failure_log = now
                    log.warning(
                        "rate limiting falls back to local counters: Redis failed (%s; %d failures so far)",
                        type(exc).__name__,
                        self.shared_failures,
                    )
        return self._count_locally(key_id, window_index)

    def _count_locally(self, key_id: str, window_index: int) -> int:
        if window_index != self._local_window:
            # Windows are aligned for every key, so a new window starts everyone
            # from zero: memory is bounded by the keys seen in one window.
            self._local = {}
            self._local_window = window_index
        count = self._local.get(key_id, 0) + 1
        self._local[key_id] = count
        return count
