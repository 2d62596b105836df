"""Admission: how many calls one process works on at once; the rest are refused at once.

Past capacity, queueing only turns every answer late (clients give up,
CANCELLED, work done for nobody). A refusal costs microseconds and tells
the caller to retry elsewhere or later, so the calls that are admitted
keep their latency. The refusal is UNAVAILABLE, not RESOURCE_EXHAUSTED:
it is the process that is full, not the caller over a quota, and every
client of ours (interceptors, middleware, Envoy's failure_mode_allow=false)
already treats UNAVAILABLE as "no answer: 503, retry", never as a denial.

One ``Admission`` per process bounds every transport: the gRPC services
through their handler wrapper (``authsvc.grpc.server``), and Envoy's HTTP
check (``authsvc.extauthz_http``) for what waits there, whose refusal is the
HTTP form of UNAVAILABLE: the 503 of a store outage.
"""

from __future__ import annotations

import sys

from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import Unavailable
from authsvc.core.keys import Decision

AT_CAPACITY = "the server is at capacity; retry shortly"


class Admission:
    """A counter of calls in flight, bounded by ``limit``; single-threaded (one event loop)."""

    def __init__(self, limit: int = sys.maxsize) -> None:
        self.limit = limit
        self.in_flight = 0

    async def complete(self, authorizer: Authorizer, pending: Pending) -> Decision:
        """``authorizer.complete(pending)`` in a slot, or ``Unavailable(AT_CAPACITY)`` at once when none is free.

        Authorize and Check take a slot here, for what waits (a cache miss, a
        rate-limited key), not for the whole call: a cache hit is answered
        without a single await, so it holds nothing while it runs, and a
        flood of unknown keys that holds every slot must not refuse it.
        """
        if self.in_flight >= self.limit:
            raise Unavailable(AT_CAPACITY)
        self.in_flight += 1
        try:
            return await authorizer.complete(pending)
        finally:
            self.in_flight -= 1

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
