"""The table of stored digests (``authsvc.core.known``) over the in-memory store, the feed played by the test.

It only ever sends a lookup the slower way: these cases pin that a stored
key is never a suspect once loaded, that nothing is while a load is missing
or outdated, and that a suspect past its budget is refused without asking
the store while one within it is looked up (and allowed, if it exists).
The end-to-end proof, a real server under a flood of forged keys, is in
``server/test_overload.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

import authsvc.core.known as known_module
from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.admission import AT_CAPACITY
from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import AtCapacity
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keyformat import digest as digest_of
from authsvc.core.keys import Reason
from authsvc.core.known import KnownDigests, SuspectBudget
from authsvc.core.ports import Found, NewKey
from authsvc.storage.memory import InMemoryStore

FORMAT = KeyFormat("authsvc")


def stored(store: InMemoryStore) -> str:
    issued = FORMAT.generate()
    store.insert(
        NewKey("acme", "ci", issued.display_prefix, issued.digest, ("read",), "alice", None, 0), datetime.now(UTC)
    )
    return issued.secret


class CountingStore(InMemoryStore):
    """Counts lookups and digest pages; a page may be held at ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.pages = 0
        self.gate: asyncio.Event | None = None

    async def find_by_digest(self, digest: bytes) -> Found:
        self.asked += 1
        return await super().find_by_digest(digest)

    async def key_digests(self, after: bytes, limit: int) -> list[bytes]:
        self.pages += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().key_digests(after, limit)


@contextlib.asynccontextmanager
async def loading(known: KnownDigests) -> AsyncIterator[None]:
    task = asyncio.create_task(known.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_ready(known: KnownDigests) -> None:
    async with asyncio.timeout(5):
        while not known.ready:  # noqa: ASYNC110  # a plain bool: the hot path reads it
            await asyncio.sleep(0.001)


async def test_once_loaded_stored_keys_are_never_suspect_and_unknown_ones_are() -> None:
    store = CountingStore()
    keys = [stored(store) for _ in range(7)]
    known = KnownDigests(store, time.monotonic, page=3)  # three pages: 3, 3, 1
    assert not known.suspect(FORMAT.generate().digest)  # not loaded: nothing is suspect
    async with loading(known):
        known.synchronised(time.monotonic())
        await until_ready(known)
    assert store.pages == 3 and len(known) == 7
    assert not any(known.suspect(digest_of(k)) for k in keys)
    assert all(known.suspect(FORMAT.generate().digest) for _ in range(100))


async def test_a_published_digest_is_known_at_once_even_while_a_load_runs() -> None:
    store = CountingStore()
    stored(store)
    known = KnownDigests(store, time.monotonic)
    store.gate = asyncio.Event()
    async with loading(known):
        known.synchronised(time.monotonic())
        await asyncio.sleep(0.01)  # the load waits at the gate
        during = FORMAT.generate().digest
        known.evict(during)  # a creation published while the first page is on its way
        store.gate.set()
        await until_ready(known)
        after = FORMAT.generate().digest
        known.evict(after)
    assert not known.suspect(during) and not known.suspect(after)


async def test_a_lost_feed_makes_nothing_suspect_until_a_load_after_the_next_subscription() -> None:
    store = CountingStore()
    known = KnownDigests(store, time.monotonic)
    async with loading(known):
        known.synchronised(time.monotonic())
        await until_ready(known)
        forged = FORMAT.generate().digest
        assert known.suspect(forged)
        known.desynchronised()
        assert not known.suspect(forged)  # changes may be missed now: look everything up as before
        store.gate = asyncio.Event()
        known.synchronised(time.monotonic())
        await asyncio.sleep(0.01)
        assert not known.suspect(forged)  # subscribed again, but not loaded since
        store.gate.set()
        await until_ready(known)
        assert known.suspect(forged)


async def test_a_load_overtaken_by_a_resubscription_is_thrown_away() -> None:
    store = CountingStore()
    first = stored(store)
    known = KnownDigests(store, time.monotonic)
    store.gate = asyncio.Event()
    async with loading(known):
        known.synchronised(time.monotonic())
        await asyncio.sleep(0.01)  # the first load waits at the gate
        known.synchronised(time.monotonic())  # the feed came back on another server
        second = stored(store)  # only the second load can see this one
        store.gate.set()
        await until_ready(known)
    assert store.pages == 2
    assert not known.suspect(digest_of(first)) and not known.suspect(digest_of(second))


def test_the_budget_allows_its_burst_then_its_rate() -> None:
    now = [0.0]
    budget = SuspectBudget(lambda: now[0], rate=10, burst=3)
    assert [budget.try_take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token's worth
    assert [budget.try_take() for _ in range(2)] == [True, False]
    now[0] += 100  # never more than the burst
    assert sum(budget.try_take() for _ in range(10)) == 3


async def test_suspects_past_the_budget_are_refused_without_a_lookup_and_stored_keys_are_not() -> None:
    store = CountingStore()
    key = stored(store)
    now = [0.0]
    known = KnownDigests(store, lambda: now[0], rate=1, burst=2)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, known=known)
    async with loading(known):
        known.synchronised(0.0)
        await until_ready(known)
    answers: list[Reason | None] = []
    for _ in range(5):
        pending = authorizer.check(FORMAT.generate().secret, "read")
        assert isinstance(pending, Pending) and pending.suspect
        try:
            answers.append((await authorizer.complete(pending)).reason)
        except AtCapacity as exc:
            assert str(exc) == AT_CAPACITY
            answers.append(None)
    assert answers == [Reason.UNKNOWN_KEY, Reason.UNKNOWN_KEY, None, None, None]
    assert store.asked == 2  # the refused three never reached the store
    # A stored key is never a suspect: allowed, however spent the budget is.
    assert [(await authorizer.authorize(key, "read")).reason for _ in range(3)] == [Reason.OK] * 3


async def test_a_key_created_elsewhere_and_not_yet_published_is_looked_up_and_known_from_then_on() -> None:
    store = CountingStore()
    known = KnownDigests(store, time.monotonic)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, known=known)
    async with loading(known):
        known.synchronised(time.monotonic())
        await until_ready(known)
    key = stored(store)  # in the store; this table never heard of it (no feed here)
    answer = authorizer.check(key, "read")
    assert isinstance(answer, Pending) and answer.suspect
    assert (await authorizer.complete(answer)).reason is Reason.OK
    assert not known.suspect(digest_of(key))


async def test_published_digests_stay_bounded_a_fresh_load_keeps_only_stored_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone who may NOTIFY the channel can publish digests; past the bound a load folds them in, serving all along."""
    monkeypatch.setattr(known_module, "_MIN_ADDED", 4)
    store = CountingStore()
    keys = [stored(store) for _ in range(3)]
    known = KnownDigests(store, time.monotonic)
    async with loading(known):
        known.synchronised(time.monotonic())
        await until_ready(known)
        bogus = [FORMAT.generate().digest for _ in range(5)]
        later = stored(store)  # stored, and published like any creation
        for digest in [*bogus, digest_of(later)]:
            known.evict(digest)
        assert known.ready and store.pages == 1  # the fifth published digest asked for a load
        async with asyncio.timeout(5):
            while store.pages < 2 or len(known) != 4:  # noqa: ASYNC110  # plain attributes
                await asyncio.sleep(0.001)
        assert known.ready
    assert all(known.suspect(d) for d in bogus)  # not stored: dropped
    assert not any(known.suspect(digest_of(k)) for k in [*keys, later])
