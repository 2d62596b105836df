"""The table of stored digests (``authsvc.core.known``) over the in-memory store, the feed played by the test.

It only ever sends a lookup the slower way: these cases pin that a stored
key is never a suspect once loaded or published, that a load overtaken by
a resubscription (or read from another server) is thrown away, that the
last load keeps serving through a lost feed and a reload, that published
digests stay bounded, and that a suspect past its budget is refused without
asking the store while one within it is looked up (and allowed, if it
exists). The end-to-end proof, a real server under a flood of forged keys,
is in ``server/test_overload.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

import authsvc.core.known as known_module
from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.admission import AT_CAPACITY, Admission
from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import AtCapacity, OverUnknownKeyBudget, Unavailable
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keyformat import digest as digest_of
from authsvc.core.keys import Reason
from authsvc.core.known import UNKNOWN_KEYS, KnownDigests, TokenBucket
from authsvc.core.ports import PREFIX_BYTES, Found, NewKey, PrefixPage
from authsvc.metrics import Metrics
from authsvc.storage.memory import InMemoryStore

FORMAT = KeyFormat("authsvc")


def stored(store: InMemoryStore) -> str:
    """A key in the store, not published to anything the test does not play itself."""
    issued = FORMAT.generate()
    store.insert(
        NewKey("acme", "ci", issued.display_prefix, issued.digest, ("read",), "alice", None, 0), datetime.now(UTC)
    )
    return issued.secret


class CountingStore(InMemoryStore):
    """Counts lookups and digest pages. A page is read, then held until the next gate the test opens."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.pages: list[bytes] = []  # each page's ``start``
        self.gates: list[asyncio.Event] | None = None
        #: Which calls (0 for the first) fail, as an unreachable database would.
        self.failing: set[int] = set()
        self.source: object = None

    async def find_by_digest(self, digest: bytes) -> Found:
        self.asked += 1
        return await super().find_by_digest(digest)

    async def key_prefixes(self, start: bytes, limit: int) -> PrefixPage:
        self.pages.append(start)
        if len(self.pages) - 1 in self.failing:
            raise Unavailable("the key store did not answer in time")
        page = await super().key_prefixes(start, limit)  # read now, as a database snapshot would be
        if self.gates is not None:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        # In reverse: the store promises no order within a page.
        packed = page.prefixes
        reverse = b"".join(packed[i - PREFIX_BYTES : i] for i in range(len(packed), 0, -PREFIX_BYTES))
        return PrefixPage(reverse, self.source)


@contextlib.asynccontextmanager
async def loading(known: KnownDigests) -> AsyncIterator[None]:
    task = asyncio.create_task(known.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110  # plain attributes the table sets
            await asyncio.sleep(0.001)


def subscribed(store: CountingStore) -> KnownDigests:
    """A table whose feed has just subscribed: ``run`` loads it."""
    known = KnownDigests(store, time.monotonic, jitter=0)
    known.synchronised(time.monotonic())
    return known


async def test_once_loaded_stored_keys_are_never_suspect_and_unknown_ones_are() -> None:
    store = CountingStore()
    keys = [stored(store) for _ in range(7)]
    known = KnownDigests(store, time.monotonic, page=3, jitter=0)  # three pages: 3, 3, 1
    assert not known.suspect(FORMAT.generate().digest)  # not loaded: nothing is suspect
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.ready)
    assert len(store.pages) == 3 and len(known) == 7
    assert not any(known.suspect(digest_of(k)) for k in keys)
    assert all(known.suspect(FORMAT.generate().digest) for _ in range(100))


@contextlib.asynccontextmanager
async def first_page_held() -> AsyncIterator[tuple[CountingStore, KnownDigests]]:
    """A table whose first load has read its page (of one key) and holds it until the test opens the gate."""
    store = CountingStore()
    stored(store)
    store.gates = []
    known = subscribed(store)
    async with loading(known):
        await until(lambda: len(store.gates or []) == 1)
        yield store, known


async def test_a_load_overtaken_by_a_resubscription_is_thrown_away() -> None:
    async with first_page_held() as (store, known):
        assert store.gates is not None
        known.synchronised(time.monotonic())  # the feed came back, maybe on another server
        second = stored(store)  # only the second load's page can hold this one
        store.gates[0].set()
        await until(lambda: len(store.gates or []) == 2)  # the second load holds its page
        assert not known.ready  # the first page was thrown away, not served
        store.gates[1].set()
        await until(lambda: known.ready)
    assert not known.suspect(digest_of(second))


async def test_the_last_load_serves_through_a_lost_feed_and_a_reload_sees_what_was_missed() -> None:
    store = CountingStore()
    known = subscribed(store)
    async with loading(known):
        await until(lambda: known.ready)
        forged = FORMAT.generate().digest
        known.desynchronised()
        missed = stored(store)  # created elsewhere while the feed was down: no notification
        assert known.ready and known.suspect(forged)  # still serving: suspects are still budgeted
        assert known.suspect(digest_of(missed))  # a suspect, so looked up within the budget, never denied
        store.gates = []
        known.synchronised(time.monotonic())
        await until(lambda: len(store.gates or []) == 1)  # the reload holds its page
        published = FORMAT.generate().digest
        known.evict(published)  # a creation notified while the reload runs
        assert known.ready and known.suspect(forged) and not known.suspect(published)
        store.gates[0].set()
        await until(lambda: known.loads == 2)
    assert not known.suspect(digest_of(missed)) and not known.suspect(published) and known.suspect(forged)


async def test_a_subscription_lost_before_its_load_starts_loads_nothing() -> None:
    store = CountingStore()
    known = KnownDigests(store, time.monotonic, jitter=0)
    async with loading(known):
        known.synchronised(time.monotonic())
        known.desynchronised()  # in the same turn: the connection was already gone
        for _ in range(10):
            await asyncio.sleep(0)
    assert store.pages == [] and not known.ready


async def test_pages_from_another_server_than_the_feed_follows_are_not_used() -> None:
    store = CountingStore()
    stored(store)
    store.source = object()  # the pool reaches another server than the feed
    known = subscribed(store)
    async with loading(known):
        await until(lambda: len(store.pages) == 1)
        await asyncio.sleep(0.01)
    assert not known.ready


async def test_a_failed_page_is_retried_from_where_it_failed() -> None:
    store = CountingStore()
    keys = [stored(store) for _ in range(5)]
    store.failing = {1}  # the second page fails, once
    known = KnownDigests(store, time.monotonic, page=2, jitter=0)
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.ready)  # after a back-off of at most a second
    # Each page starts just past the last prefix of the one before.
    ends = [int.from_bytes(d[:PREFIX_BYTES], "big") + 1 for d in sorted(digest_of(k) for k in keys)]
    starts = [end.to_bytes(PREFIX_BYTES, "big") for end in ends]
    assert store.pages == [b"", starts[1], starts[1], starts[3]]
    assert not any(known.suspect(digest_of(k)) for k in keys)


async def test_a_full_page_ending_at_the_last_prefix_ends_the_load() -> None:
    """No page can start past ``ff ff ff ff``: a full page that ends there is the last one."""
    store = CountingStore()
    for last in (b"\xfe", b"\xff"):
        issued = FORMAT.generate()
        digest = b"\xff\xff\xff" + last + issued.digest[PREFIX_BYTES:]
        new = NewKey("acme", "ci", issued.display_prefix, digest, ("read",), "alice", None, 0)
        store.insert(new, datetime.now(UTC))
    known = KnownDigests(store, time.monotonic, page=1, jitter=0)
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.ready)
    assert len(store.pages) == 2 and len(known) == 2


async def test_an_unreadable_notification_changes_nothing() -> None:
    store = CountingStore()
    known = subscribed(store)
    async with loading(known):
        await until(lambda: known.ready)
        known.clear()  # someone else's NOTIFY on the channel
        await asyncio.sleep(0.01)
    assert known.ready and len(store.pages) == 1  # no reload: a stranger cannot make every process scan


async def test_published_digests_are_folded_in_by_a_fresh_load_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone who may NOTIFY the channel can publish digests: past the bound a load folds them in (what
    is published during it is kept), and past four times the bound more are ignored until then."""
    monkeypatch.setattr(known_module, "_MIN_ADDED", 4)
    store = CountingStore()
    keys = [stored(store) for _ in range(3)]
    known = subscribed(store)
    async with loading(known):
        await until(lambda: known.ready)
        store.gates = []
        bogus = [FORMAT.generate().digest for _ in range(5)]
        later = stored(store)  # stored, and published like any creation
        for digest in [*bogus, digest_of(later)]:
            known.evict(digest)  # the fifth one asks for a compaction
        await until(lambda: len(store.gates or []) == 1)  # the compaction holds its page
        during = FORMAT.generate().digest
        known.evict(during)  # published while the compaction reads: its page may not have it
        flood = [FORMAT.generate().digest for _ in range(40)]
        for digest in flood:
            known.evict(digest)
        assert len(known) == 3 + 16  # at most four times the bound beside the table
        assert known.ready and not known.suspect(bogus[0])  # serving all along
        store.gates[0].set()
        await until(lambda: known.loads == 2)
    assert all(known.suspect(d) for d in bogus)  # published before the compaction, not stored: dropped
    assert not known.suspect(during)
    assert not any(known.suspect(digest_of(k)) for k in [*keys, later])


def test_the_budget_allows_its_burst_then_its_rate() -> None:
    now = [0.0]
    budget = TokenBucket(lambda: now[0], rate=10, burst=3)
    assert [budget.try_take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token's worth
    assert [budget.try_take() for _ in range(2)] == [True, False]
    now[0] += 100  # never more than the burst
    assert sum(budget.try_take() for _ in range(10)) == 3


async def test_suspects_past_the_budget_are_refused_without_a_lookup_and_stored_keys_are_not() -> None:
    store = CountingStore()
    key = stored(store)
    now = [0.0]
    known = KnownDigests(store, lambda: now[0], rate=1, burst=2, jitter=0)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, known=known)
    async with loading(known):
        known.synchronised(0.0)
        await until(lambda: known.ready)
    answers: list[Reason | None] = []
    for _ in range(5):
        pending = authorizer.check(FORMAT.generate().secret, "read")
        assert isinstance(pending, Pending) and pending.suspect
        try:
            answers.append((await authorizer.complete(pending)).reason)
        except AtCapacity as exc:
            assert str(exc) == UNKNOWN_KEYS
            answers.append(None)
    assert answers == [Reason.UNKNOWN_KEY, Reason.UNKNOWN_KEY, None, None, None]
    assert store.asked == 2  # the refused three never reached the store
    assert authorizer.admission.in_flight == 0  # a refused suspect gave its slot back
    # A stored key is never a suspect: allowed, however spent the budget is.
    assert [(await authorizer.authorize(key, "read")).reason for _ in range(3)] == [Reason.OK] * 3


async def loaded_authorizer() -> tuple[CountingStore, KnownDigests, Authorizer]:
    """An authorizer whose table has loaded an empty store (the loader stopped after it)."""
    store = CountingStore()
    known = subscribed(store)
    authorizer = Authorizer(store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, known=known)
    async with loading(known):
        await until(lambda: known.ready)
    return store, known, authorizer


async def test_a_key_created_elsewhere_and_not_yet_published_is_looked_up_and_known_from_then_on() -> None:
    store, known, authorizer = await loaded_authorizer()
    key = stored(store)  # in the store; this table never heard of it (no feed here)
    answer = authorizer.check(key, "read")
    assert isinstance(answer, Pending) and answer.suspect
    assert (await authorizer.complete(answer)).reason is Reason.OK
    assert not known.suspect(digest_of(key))


async def test_a_key_this_process_created_is_no_suspect_before_its_notification_returns() -> None:
    store, _, authorizer = await loaded_authorizer()
    key = stored(store)
    authorizer.evict(digest_of(key))  # what KeyManager calls after it wrote the key
    answer = authorizer.check(key, "read")
    assert isinstance(answer, Pending) and not answer.suspect


async def test_a_compaction_of_a_multi_page_table_reads_it_all_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_module, "_MIN_ADDED", 2)
    store = CountingStore()
    keys = [stored(store) for _ in range(5)]
    known = KnownDigests(store, time.monotonic, page=2, jitter=0)  # pages of 2, 2, 1
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.loads == 1)
        later = [stored(store) for _ in range(3)]  # created elsewhere, then published
        for key in later:
            known.evict(digest_of(key))  # the third asks for a compaction
        await until(lambda: known.loads == 2)
    assert store.pages[3] == b""  # the compaction started from the first page, not from the last load's end
    assert len(known) == 8 and not any(known.suspect(digest_of(k)) for k in [*keys, *later])


async def test_a_load_under_way_when_the_feed_is_lost_is_thrown_away() -> None:
    async with first_page_held() as (store, known):
        assert store.gates is not None
        known.desynchronised()  # the feed is gone while the page is on its way
        store.gates[0].set()
        for _ in range(10):
            await asyncio.sleep(0)
    assert not known.ready and known.loads == 0


async def test_compactions_come_at_most_once_an_interval_and_a_capped_set_still_gets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(known_module, "_MIN_ADDED", 2)
    monkeypatch.setattr(known_module, "_COMPACTION_INTERVAL", 0.3)
    store = CountingStore()
    known = subscribed(store)
    async with loading(known):
        await until(lambda: known.loads == 1)
        for _ in range(3):
            known.evict(FORMAT.generate().digest)  # not stored: junk on the channel
        await until(lambda: known.loads == 2)
        for _ in range(20):  # past the cap (4 x 2) within the interval: no load, more are ignored
            known.evict(FORMAT.generate().digest)
        await asyncio.sleep(0.05)
        assert known.loads == 2 and len(known) == 8
        await asyncio.sleep(0.3)
        real = stored(store)
        known.evict(digest_of(real))  # ignored (capped), but the interval is over: a compaction
        await until(lambda: known.loads == 3)
    assert len(known) == 1 and not known.suspect(digest_of(real))  # the junk is gone, the stored key is in


async def test_a_suspect_refused_for_want_of_a_slot_keeps_its_budget_token() -> None:
    store = CountingStore()
    known = KnownDigests(store, time.monotonic, rate=0.001, burst=1, jitter=0)
    admission = Admission(0)
    authorizer = Authorizer(
        store, load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time, known=known, admission=admission
    )
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.ready)
    pending = authorizer.check(FORMAT.generate().secret, "read")
    assert isinstance(pending, Pending) and pending.suspect
    with pytest.raises(AtCapacity, match=AT_CAPACITY):
        await authorizer.complete(pending)
    admission.limit = 1
    again = authorizer.check(FORMAT.generate().secret, "read")
    assert isinstance(again, Pending)
    assert (await authorizer.complete(again)).reason is Reason.UNKNOWN_KEY  # the one token was still there


async def test_a_refusal_past_the_budget_is_counted_apart_from_capacity() -> None:
    """An alert tells a forged-key flood (``unknown_key_budget``) from a process short of room (``at_capacity``)."""
    store = CountingStore()
    metrics = Metrics()
    known = KnownDigests(store, time.monotonic, rate=0.001, burst=1, jitter=0)
    authorizer = Authorizer(
        store,
        load_catalog(DEFAULT_CATALOG),
        FORMAT,
        clock=time.time,
        known=known,
        metrics=metrics,
        timer=time.perf_counter,
        admission=Admission(1),
    )
    async with loading(known):
        known.synchronised(time.monotonic())
        await until(lambda: known.ready)
    assert (await authorizer.authorize(FORMAT.generate().secret, "read")).reason is Reason.UNKNOWN_KEY
    with pytest.raises(OverUnknownKeyBudget, match=UNKNOWN_KEYS):
        await authorizer.authorize(FORMAT.generate().secret, "read")
    counted = {(reason, transport): n for reason, transport, n in metrics.snapshot()["authorize"]}
    assert counted == {("unknown_key", "grpc"): 1, ("unknown_key_budget", "grpc"): 1}
