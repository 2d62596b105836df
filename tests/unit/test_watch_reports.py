"""How WatchDecisions checks a usage report's digests (``authsvc.grpc.watch``): batched, budgeted, remembered.

The end-to-end proof, a real server and stream, is
``grpc/test_key_usage.py::test_a_usage_report_counts_only_for_the_key_its_digest_proves``; here the
key lookup is a stand-in that counts how many run at once.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from authsvc.core.errors import AtCapacity
from authsvc.core.fanout import Fanout
from authsvc.grpc import watch
from authsvc.grpc.watch import LOOKUP_BATCH, WatchAdapter


class Holders:
    """Answers for even-numbered digests (their last byte), none for odd ones; ``refuse`` raises at capacity."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.running = self.most = 0
        self.refuse = False

    async def __call__(self, digest: bytes) -> str | None:
        self.asked.append(digest)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)
            if self.refuse:
                raise AtCapacity("at capacity")
            return f"key-{digest.hex()[:8]}" if digest[-1] % 2 == 0 else None
        finally:
            self.running -= 1


def adapter(holders: Holders) -> WatchAdapter:
    return WatchAdapter(Fanout(lambda: True), None, time.time, holders)


def digests(n: int) -> set[bytes]:
    return {os.urandom(31) + bytes([i % 256]) for i in range(n)}


async def test_new_digests_are_looked_up_a_batch_at_a_time_and_found_ones_are_remembered() -> None:
    holders = Holders()
    reported = digests(1000)
    found = await adapter(holders)._holders_of(reported)
    assert len(holders.asked) == 1000 and holders.most == LOOKUP_BATCH  # one batch in flight at a time
    assert set(found) == {d for d in reported if d[-1] % 2 == 0}
    assert all(found[d] == f"key-{d.hex()[:8]}" for d in found)


async def test_a_digest_checked_once_is_not_looked_up_again_and_an_unknown_one_is() -> None:
    holders = Holders()
    a = adapter(holders)
    reported = digests(10)
    await a._holders_of(reported)
    again = await a._holders_of(reported)
    assert len(holders.asked) == 15  # the 5 stored ones once, the 5 unknown ones again (Authorizer.holder caches those)
    assert len(again) == 5


async def test_digests_past_the_budget_or_refused_are_not_counted_and_are_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "LOOKUP_BURST", 100.0)
    monkeypatch.setattr(watch, "LOOKUP_RATE", 0.001)
    holders = Holders()
    a = adapter(holders)
    found = await a._holders_of(digests(300))
    assert len(holders.asked) == 100 and len(found) <= 100  # the rest wait for the budget
    holders.refuse, holders.asked = True, []
    monkeypatch.setattr(a._budget, "try_take", lambda: True)
    refused = digests(4)
    assert await a._holders_of(refused) == {}
    holders.refuse = False
    assert len(await a._holders_of(refused)) == 2  # refused once, not remembered as unknown: checked again


async def test_what_is_not_a_digest_is_never_looked_up() -> None:
    holders = Holders()
    assert await adapter(holders)._holders_of({b"", b"\0" * 5, b"\0" * 33}) == {}
    assert holders.asked == []



