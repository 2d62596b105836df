"""The rate limiter's circuit breaker, on a counter that fails on demand and a clock the test moves.

The end-to-end proof (a real server, a hung Redis that counts what reaches
it) is ``server/test_overload.py``; these cases pin the breaker's states.
"""

from __future__ import annotations

import asyncio

from authsvc.core.keys import Decision, Principal, Reason
from authsvc.core.ratelimit import RateLimiter

ALLOWED = Decision(Reason.OK, Principal("key-1", "acme", "alice", ("read",), "authsvc_abcd", "ci"))


class FlakyCounter:
    def __init__(self) -> None:
        self.failing = False
        self.calls = 0
        self.count = 0
        self.gate: asyncio.Event | None = None

    async def incr(self, name: str, ttl_seconds: int) -> int:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise TimeoutError("redis timed out")
        self.count += 1
        return self.count

    async def close(self) -> None:
        pass


def limiter() -> tuple[RateLimiter, FlakyCounter, list[float]]:
    counter = FlakyCounter()
    now = [0.0]
    return RateLimiter(10, 60, counter, monotonic=lambda: now[0], breaker_seconds=1.0), counter, now


async def test_after_a_failure_redis_is_not_asked_until_the_open_period_ends() -> None:
    rl, counter, now = limiter()
    counter.failing = True
    await rl.apply(ALLOWED, 0, 0.0)
    assert counter.calls == 1 and rl.breaker_open
    for _ in range(20):
        now[0] += 0.04
        await rl.apply(ALLOWED, 0, 0.0)
    assert counter.calls == 1  # 0.8 s open: nothing asked


async def test_one_probe_after_the_open_period_closes_the_breaker_when_redis_answers() -> None:
    rl, counter, now = limiter()
    counter.failing = True
    await rl.apply(ALLOWED, 0, 0.0)
    counter.failing = False
    now[0] = 1.0
    decision = await rl.apply(ALLOWED, 0, 0.0)
    assert counter.calls == 2 and not rl.breaker_open
    assert decision.rate_limit is not None and decision.rate_limit.remaining == 9  # Redis's count: 1


async def test_a_failed_probe_keeps_the_breaker_open_another_period() -> None:
    rl, counter, now = limiter()
    counter.failing = True
    await rl.apply(ALLOWED, 0, 0.0)
    now[0] = 1.0
    await rl.apply(ALLOWED, 0, 0.0)
    now[0] = 1.9
    await rl.apply(ALLOWED, 0, 0.0)
    assert counter.calls == 2 and rl.breaker_open


async def test_calls_during_the_probe_count_locally_instead_of_queueing_behind_it() -> None:
    rl, counter, now = limiter()
    counter.failing = True
    await rl.apply(ALLOWED, 0, 0.0)
    now[0] = 1.0
    counter.gate = asyncio.Event()
    probe = asyncio.create_task(rl.apply(ALLOWED, 0, 0.0))
    await asyncio.sleep(0)
    others = [await rl.apply(ALLOWED, 0, 0.0) for _ in range(3)]
    assert counter.calls == 2  # the first failure, and the probe still out
    assert all(d.reason is Reason.OK for d in others)
    counter.failing = False
    counter.gate.set()
    await probe
    assert not rl.breaker_open
