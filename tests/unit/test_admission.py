"""The core's admission bound on what waits, over the in-memory store with lookups held at a gate.

The end-to-end proof (a real server, PostgreSQL locked, Authorize, Check and
the HTTP check together) is ``server/test_overload.py``; these cases pin that
``Authorizer.complete`` refuses before it asks the store and always gives
its slot back.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.admission import AT_CAPACITY, Admission
from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import AtCapacity, Unavailable
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Reason
from authsvc.core.ports import Found, NewKey
from authsvc.core.ratelimit import RateLimiter
from authsvc.metrics import Metrics
from authsvc.storage.memory import InMemoryStore

FORMAT = KeyFormat("authsvc")


class GatedStore(InMemoryStore):
    """Lookups wait for ``gate``; ``asked`` counts the ones that reached the store."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.asked = 0

    async def find_by_digest(self, digest: bytes) -> Found:
        self.asked += 1
        await self.gate.wait()
        return await super().find_by_digest(digest)


def pending(authorizer: Authorizer) -> Pending:
    answer = authorizer.check(FORMAT.generate().secret, "read")
    assert isinstance(answer, Pending)  # a well-formed key nobody has: a lookup
    return answer


async def test_past_the_limit_a_lookup_is_refused_at_once_without_asking_the_store() -> None:
    store = GatedStore()
    admission = Admission(2)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, admission=admission)
    waiting = [asyncio.create_task(authorizer.complete(pending(authorizer))) for _ in range(2)]
    await asyncio.sleep(0)
    assert (store.asked, admission.in_flight) == (2, 2)
    with pytest.raises(AtCapacity, match=AT_CAPACITY):
        await asyncio.wait_for(authorizer.complete(pending(authorizer)), 1)  # at once, or TimeoutError
    assert store.asked == 2  # the refused call never reached the store
    store.gate.set()
    assert [d.reason for d in await asyncio.gather(*waiting)] == [Reason.UNKNOWN_KEY] * 2
    assert admission.in_flight == 0
    assert (await authorizer.complete(pending(authorizer))).reason is Reason.UNKNOWN_KEY  # a slot is free again


async def test_a_cancelled_or_failed_lookup_gives_its_slot_back() -> None:
    store = GatedStore()
    admission = Admission(1)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, admission=admission)
    task = asyncio.create_task(authorizer.complete(pending(authorizer)))
    await asyncio.sleep(0)
    assert admission.in_flight == 1
    task.cancel()  # the client gave up
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.in_flight == 0

    async def unreachable(digest: bytes) -> Found:
        raise Unavailable("the key store did not answer in time")

    store.find_by_digest = unreachable  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="did not answer"):
        await authorizer.complete(pending(authorizer))
    assert admission.in_flight == 0


class GatedCounter:
    """Redis's part of a rate limit: every count waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.count = 0
        self.asked = 0

    async def incr(self, name: str, ttl_seconds: int) -> int:
        self.asked += 1
        await self.gate.wait()
        self.count += 1
        return self.count

    async def close(self) -> None:
        return None


async def test_a_count_waiting_on_redis_holds_a_slot_and_a_refusal_is_counted_as_at_capacity() -> None:
    """A rate-limited key's count may wait on Redis: that is waiting too, and overload is not an outage."""
    store = InMemoryStore()
    issued = FORMAT.generate()
    store.insert(
        NewKey("acme", "ci", issued.display_prefix, issued.digest, ("read",), "alice", None, 0), datetime.now(UTC)
    )
    counter = GatedCounter()
    metrics = Metrics()
    admission = Admission(1)
    authorizer = Authorizer(
        store,
        load_catalog(DEFAULT_CATALOG),
        FORMAT,
        clock=time.time,
        limiter=RateLimiter(100, 1, counter, monotonic=time.monotonic),
        metrics=metrics,
        timer=time.perf_counter,
        admission=admission,
    )
    waiting = asyncio.create_task(authorizer.authorize(issued.secret, "read"))
    await asyncio.sleep(0.01)
    assert (admission.in_flight, counter.asked) == (1, 1)  # looked up, now counting on Redis
    with pytest.raises(AtCapacity, match=AT_CAPACITY):
        await asyncio.wait_for(authorizer.authorize(FORMAT.generate().secret, "read"), 1)
    counter.gate.set()
    assert (await waiting).reason is Reason.OK
    assert admission.in_flight == 0
    counted = {(reason, transport): n for reason, transport, n in metrics.snapshot()["authorize"]}
    assert counted == {("ok", "grpc"): 1, ("at_capacity", "grpc"): 1}  # not "unavailable": no store is down
