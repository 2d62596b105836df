"""Admission: how many calls one process has waiting at once; the rest are refused at once.

Past capacity, queueing only turns every answer late (clients give up,
CANCELLED, work done for nobody). A refusal costs microseconds and tells
the caller to retry elsewhere or later, so the calls that are admitted
keep their latency. The refusal is UNAVAILABLE, not RESOURCE_EXHAUSTED:
it is the process that is full, not the caller over a quota, and every
client of ours (interceptors, middleware, Envoy's failure_mode_allow=false)
already treats UNAVAILABLE as "no answer: 503, retry", never as a denial.

One ``Admission`` per process bounds every transport. What waits in
``Authorizer.complete`` (a cache miss, a rate-limited key) takes a slot
there, whichever transport asked: a cache hit is answered without a single
await, so it holds nothing while it runs, and a flood of unknown keys that
holds every slot must not refuse it. Management calls take one in the gRPC
handler wrapper (``authsvc.grpc.server``).
"""

from __future__ import annotations

import sys

AT_CAPACITY = "the server is at capacity; retry shortly"
"""The message of every refusal at capacity (``AtCapacity``), whichever transport answers."""


class Admission:
    """A counter of calls in flight, bounded by ``limit``; single-threaded (one event loop)."""

    def __init__(self, limit: int = sys.maxsize) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
