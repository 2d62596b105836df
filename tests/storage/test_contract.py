"""The storage contract: every ``KeyStore`` and ``InvalidationFeed`` keeps the same promises.

Each case runs against PostgreSQL (a real server over a real connection,
asyncpg, LISTEN/NOTIFY) and against the in-memory store that ships in the
package. The core is written against these promises only, so a store that
passes here can back it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from authsvc_client._cache import DecisionCache

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.authorizer import Authorizer
from authsvc.core.errors import FailedPrecondition, PermissionDenied
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Actor, ApiKey, Caller, KeyGrant, KeyState, Reason, Role
from authsvc.core.manager import KeyManager
from authsvc.core.ports import (
    PREFIX_BYTES,
    AuditQuery,
    Found,
    InvalidationFeed,
    KeyStore,
    KeyUpdate,
    NewKey,
    Page,
    Rotation,
    TooManyActiveKeys,
)
from authsvc.storage.memory import InMemoryStore
from authsvc.storage.notify import PostgresFeed
from authsvc.storage.postgres import PostgresStore, create_pool, run_migrations
from tests.support import new_org

FORMAT = KeyFormat("authsvc")
CATALOG = load_catalog(DEFAULT_CATALOG)
ADMIN = Actor("alice", Role.ADMIN)
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Backend:
    """One store with its feed, and how to make its feed lose its connection."""

    store: KeyStore
    feed: InvalidationFeed
    lose_feed: Callable[[], Awaitable[None]]
    audit_trail: Callable[[str], Awaitable[list[AuditEntry]]]
    """An organization's audit rows, oldest first, as read back from the store itself."""


@dataclass(frozen=True)
class AuditEntry:
    action: str
    outcome: str
    actor: str
    caller: str | None


@dataclass
class Recorder:
    """A feed subscriber that writes down what it is told."""

    evicted: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _note(self, event: str) -> None:
        self.events.append(event)
        self.changed.set()

    def evict(self, digest: bytes) -> None:
        self.evicted.append(digest)
        self._note("evict")

    def clear(self) -> None:
        self._note("clear")

    def alive(self, sent_at: float) -> None:
        pass

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        self._note("synchronised")

    def desynchronised(self) -> None:
        self._note("desynchronised")

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await run_migrations(database_url)
    pool = await create_pool(database_url)
    yield pool
    await pool.close()


@pytest.fixture(params=["postgres", "memory"])
async def backend(request: pytest.FixtureRequest, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = InMemoryStore()

        async def lose_memory() -> None:
            memory.feed.lose()
            memory.feed.restore()

        async def memory_trail(org: str) -> list[AuditEntry]:
            return [
                AuditEntry(r.action, r.outcome, r.actor.user_id, r.actor.caller)
                for r in memory.audit_rows
                if r.org_id == org
            ]

        yield Backend(memory, memory.feed, lose_memory, memory_trail)
        await memory.feed.stop()
        return
    feed = PostgresFeed(database_url)

    async def lose_postgres() -> None:
        pid = feed.backend_pid
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)

    async def postgres_trail(org: str) -> list[AuditEntry]:
        rows = await pool.fetch(
            "SELECT action, outcome, actor_user_id, caller FROM audit_events WHERE org_id = $1 ORDER BY id", org
        )
        return [AuditEntry(r["action"], r["outcome"], r["actor_user_id"], r["caller"]) for r in rows]

    yield Backend(PostgresStore(pool, lookup_timeout=2.0), feed, lose_postgres, postgres_trail)
    await feed.stop()


def new_key(org: str, *, scopes: tuple[str, ...] = ("read",), expire: datetime | None = None) -> tuple[NewKey, str]:
    issued = FORMAT.generate()
    return NewKey(org, "ci", issued.display_prefix, issued.digest, scopes, "alice", expire, 0), issued.secret


async def create(store: KeyStore, org: str, **kwargs: object) -> tuple[ApiKey, NewKey, str]:
    new, secret = new_key(org, **kwargs)  # type: ignore[arg-type]
    return await store.create_key(new, ADMIN, 10, NOW), new, secret


# -- create, get, list, revoke -------------------------------------------------


async def test_a_created_key_reads_back_as_it_was_created(backend: Backend) -> None:
    org = new_org()
    key, new, _ = await create(backend.store, org, scopes=("read", "write"))
    assert (key.org_id, key.name, key.prefix, key.created_by) == (org, "ci", new.prefix, "alice")
    assert set(key.scopes) == {"read", "write"}
    assert key.create_time == NOW and key.revoke_time is None and key.last_used_time is None
    assert await backend.store.get_key(org, key.id) == key
    assert (await backend.store.find_by_digest(new.digest)).key == key


async def test_another_organizations_key_is_not_found(backend: Backend) -> None:
    key, _, _ = await create(backend.store, new_org())
    assert await backend.store.get_key(new_org(), key.id) is None
    assert await backend.store.revoke_key(new_org(), key.id, ADMIN, "x", NOW) is None


async def test_an_unknown_digest_finds_nothing(backend: Backend) -> None:
    assert (await backend.store.find_by_digest(b"\0" * 32)).key is None


def _split(packed: bytes) -> list[bytes]:
    return [packed[i : i + PREFIX_BYTES] for i in range(0, len(packed), PREFIX_BYTES)]


async def test_every_stored_digest_pages_out_as_its_prefix_smallest_first_whatever_its_state(backend: Backend) -> None:
    """What a process's table of stored digests is loaded from (``authsvc.core.known``)."""
    org = new_org()
    made = [await create(backend.store, org) for _ in range(3)]
    await backend.store.revoke_key(org, made[0][0].id, ADMIN, "gone", NOW)
    ours = sorted(new.digest for _, new, _ in made)
    seen: list[bytes] = []
    start = b""
    while chunk := _split((await backend.store.key_prefixes(start, 500)).prefixes):
        seen += chunk
        start = (int.from_bytes(max(chunk), "big") + 1).to_bytes(PREFIX_BYTES, "big")
        if len(chunk) < 500:
            break
    assert {d[:PREFIX_BYTES] for d in ours} <= set(seen)  # the revoked one too
    # A page is the ``limit`` smallest digests from ``start`` on (inclusive), each cut to its prefix.
    page = await backend.store.key_prefixes(ours[1], 2)
    assert sorted(_split(page.prefixes)) == sorted(p for p in seen if p >= ours[1][:PREFIX_BYTES])[:2]
    # The server it read from, as a lookup names it: a load is kept only if it matches the feed's.
    assert page.source is (await backend.store.find_by_digest(ours[1])).source


async def test_list_filters_by_state_newest_first_and_pages(backend: Backend) -> None:
    org = new_org()
    store = backend.store
    expired, _, _ = await create(store, org, expire=NOW - timedelta(seconds=1))
    first, _, _ = await create(store, org)
    revoked, _, _ = await create(store, org)
    await store.revoke_key(org, revoked.id, ADMIN, "gone", NOW)
    everything = await store.list_keys(org, None, NOW, 0, 10)
    assert everything.total == 3
    assert {k.id for k in everything.keys} == {expired.id, first.id, revoked.id}
    times = [(k.create_time, k.id) for k in everything.keys]
    assert times == sorted(times, reverse=True)
    for state, expected in ((KeyState.ACTIVE, first), (KeyState.EXPIRED, expired), (KeyState.REVOKED, revoked)):
        page = await store.list_keys(org, state, NOW, 0, 10)
        assert (page.total, [k.id for k in page.keys]) == (1, [expected.id])
    second_page = await store.list_keys(org, None, NOW, 2, 2)
    assert (second_page.total, len(second_page.keys)) == (3, 1)


async def test_the_key_limit_holds_under_concurrent_creates(backend: Backend) -> None:
    org = new_org()

    async def attempt() -> ApiKey | None:
        try:
            return await backend.store.create_key(new_key(org)[0], ADMIN, 3, NOW)
        except TooManyActiveKeys:
            return None

    results = await asyncio.gather(*(attempt() for _ in range(12)))
    assert sum(r is not None for r in results) == 3
    assert (await backend.store.list_keys(org, KeyState.ACTIVE, NOW, 0, 20)).total == 3


async def test_revoked_and_expired_keys_free_their_slot(backend: Backend) -> None:
    org = new_org()
    store = backend.store
    await store.create_key(new_key(org, expire=NOW - timedelta(seconds=1))[0], ADMIN, 2, NOW)
    key = await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    await store.revoke_key(org, key.id, ADMIN, "x", NOW)
    await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    with pytest.raises(TooManyActiveKeys):
        await store.create_key(new_key(org)[0], ADMIN, 2, NOW)



# -- the audit trail names the authenticated caller ---------------------------


async def test_every_audit_row_records_the_authenticated_caller(backend: Backend) -> None:
    org = new_org()
    by_token = Actor("alice", Role.ADMIN, caller="ci-deployer")
    key = await backend.store.create_key(new_key(org)[0], by_token, 10, NOW)
    await backend.store.revoke_key(org, key.id, by_token, "rotated", NOW)
    await backend.store.revoke_key(org, key.id, Actor("bob", Role.OWNER, caller="ops-cert"), "again", NOW)
    await backend.store.audit("key.get", org, Actor("mike", Role.MEMBER), key.id, "ok", {})
    assert await backend.audit_trail(org) == [
        AuditEntry("key.create", "ok", "alice", "ci-deployer"),
        AuditEntry("key.revoke", "ok", "alice", "ci-deployer"),
        AuditEntry("key.revoke", "already_revoked", "bob", "ops-cert"),
        AuditEntry("key.get", "ok", "mike", None),  # unprotected management: nobody authenticated
    ]


async def test_an_org_bound_caller_is_denied_elsewhere_and_the_denial_is_audited(backend: Backend) -> None:
    """Through the KeyManager: the binding is the core's rule, the caller's name reaches the store."""
    own, other = new_org(), new_org()
    manager = KeyManager(backend.store, CATALOG, FORMAT, clock=lambda: NOW)
    bound = Caller("acme-bot", frozenset({own}))
    created = await manager.create_key(own, ADMIN, "ci", ["read"], None, caller=bound)
    with pytest.raises(PermissionDenied, match="acme-bot"):
        await manager.create_key(other, ADMIN, "ci", ["read"], None, caller=bound)
    with pytest.raises(PermissionDenied):
        await manager.list_keys(other, ADMIN, 1, 10, None, caller=bound)
    assert (await backend.store.list_keys(other, None, NOW, 0, 10)).total == 0
    assert await backend.audit_trail(own) == [AuditEntry("key.create", "ok", "alice", "acme-bot")]
    assert await backend.audit_trail(other) == [
        AuditEntry("key.create", "denied", "alice", "acme-bot"),
        AuditEntry("key.list", "denied", "alice", "acme-bot"),
    ]
    await manager.revoke_key(own, ADMIN, created.key.id, "done", caller=bound)

async def test_a_revocation_is_final_and_keeps_the_first_reason(backend: Backend) -> None:
    org = new_org()
    key, new, _ = await create(backend.store, org)
    first = await backend.store.revoke_key(org, key.id, ADMIN, "leaked", NOW)
    assert first is not None and first[1] == new.digest
    assert (first[0].revoke_time, first[0].revoked_by, first[0].revoke_reason) == (NOW, "alice", "leaked")
    again = await backend.store.revoke_key(org, key.id, Actor("bob", Role.OWNER), "other", NOW + timedelta(hours=1))
    assert again is not None and again[0] == first[0]
    found = (await backend.store.find_by_digest(new.digest)).key
    assert found is not None and found.revoke_time == NOW


async def test_scopes_never_change(backend: Backend) -> None:
    org = new_org()
    key, new, _ = await create(backend.store, org, scopes=("read",))
    await backend.store.record_last_used({key.id: NOW + timedelta(seconds=5)})
    await backend.store.revoke_key(org, key.id, ADMIN, "x", NOW)
    for found in (await backend.store.get_key(org, key.id), (await backend.store.find_by_digest(new.digest)).key):
        assert found is not None and found.scopes == ("read",)


async def test_last_used_time_never_moves_backwards(backend: Backend) -> None:
    org = new_org()
    key, _, _ = await create(backend.store, org)
    later, earlier = NOW + timedelta(seconds=10), NOW + timedelta(seconds=5)
    await backend.store.record_last_used({key.id: later})
    await backend.store.record_last_used({key.id: earlier})
    found = await backend.store.get_key(org, key.id)
    assert found is not None and found.last_used_time == later


async def test_the_store_answers_its_health_ping(backend: Backend) -> None:
    assert await backend.store.ping(budget=2.0)


# -- the invalidation feed -------------------------------------------------------


async def subscribed(backend: Backend) -> Recorder:
    recorder = Recorder()
    backend.feed.subscribe(recorder)
    await backend.feed.start()
    await recorder.wait_for(lambda: "synchronised" in recorder.events)
    return recorder


async def test_creates_and_revocations_reach_the_feed(backend: Backend) -> None:
    recorder = await subscribed(backend)
    org = new_org()
    key, new, _ = await create(backend.store, org)
    await recorder.wait_for(lambda: new.digest in recorder.evicted)
    recorder.evicted.clear()
    await backend.store.revoke_key(org, key.id, ADMIN, "x", NOW)
    await recorder.wait_for(lambda: new.digest in recorder.evicted)


async def test_a_lost_feed_desynchronises_then_starts_over(backend: Backend) -> None:
    recorder = await subscribed(backend)
    recorder.events.clear()
    await backend.lose_feed()
    await recorder.wait_for(lambda: recorder.events[-1:] == ["synchronised"])
    assert recorder.events.index("desynchronised") < recorder.events.index("synchronised")


# -- the race that matters: a lookup that straddles a revocation ------------------


class GatedStore:
    """The real store, with every lookup held after it has read, until released."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def find_by_digest(self, digest: bytes) -> Found:
        record = await self.inner.find_by_digest(digest)
        self.read.set()
        await self.release.wait()
        return record

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_lookup_that_started_before_a_revocation_never_leaves_an_allow_cached(backend: Backend) -> None:
    cache: DecisionCache[KeyGrant] = DecisionCache(100, 5.0, time.monotonic)
    backend.feed.subscribe(cache)
    recorder = await subscribed(backend)
    gated = GatedStore(backend.store)
    authorizer = Authorizer(gated, CATALOG, FORMAT, clock=time.time, cache=cache)  # type: ignore[arg-type]
    org = new_org()
    key, new, secret = await create(backend.store, org)
    await recorder.wait_for(lambda: new.digest in recorder.evicted)
    recorder.evicted.clear()

    lookup = asyncio.create_task(authorizer.authorize(secret, "read"))
    await asyncio.wait_for(gated.read.wait(), 5)  # it has read the key as active...
    # ...and another replica revokes it: this process hears of it only through the feed.
    manager = KeyManager(backend.store, CATALOG, FORMAT, clock=lambda: datetime.now(UTC))
    await manager.revoke_key(org, ADMIN, key.id, "leaked")
    await recorder.wait_for(lambda: new.digest in recorder.evicted)
    gated.release.set()
    await asyncio.wait_for(lookup, 5)  # answered as of when it read; that is allowed

    decision = await authorizer.authorize(secret, "read")
    assert decision.reason is Reason.REVOKED
    assert not isinstance(cache.get(new.digest), KeyGrant) or cache.get(new.digest).revoked  # type: ignore[union-attr]


# -- rotation, updates, offboarding (issue 13) ---------------------------------------


def successor_of(old: ApiKey, grace_until: datetime) -> tuple[Rotation, NewKey]:
    issued = FORMAT.generate()
    new = NewKey(
        old.org_id, old.name, issued.display_prefix, issued.digest, old.scopes, "bob", None, 0, old.labels, old.id
    )
    return Rotation(successor=new, old_expire_time=grace_until), new


async def test_a_rotation_links_both_keys_and_ends_the_old_one_at_the_given_time(backend: Backend) -> None:
    recorder = await subscribed(backend)
    org = new_org()
    old, old_new, _ = await create(backend.store, org)
    until = NOW + timedelta(hours=1)
    rotation, successor = successor_of(old, until)
    rotated = await backend.store.rotate_key(org, old.id, ADMIN, NOW, lambda _: rotation, "yearly")
    assert rotated is not None
    assert rotated.key.rotated_from == old.id and rotated.key.created_by == "bob" and not rotated.key.rotated_to
    assert rotated.previous.rotated_to == rotated.key.id and rotated.previous.expire_time == until
    assert rotated.digests == (old_new.digest, successor.digest)
    assert (await backend.store.find_by_digest(old_new.digest)).key == rotated.previous
    assert (await backend.store.find_by_digest(successor.digest)).key == rotated.key
    await recorder.wait_for(lambda: old_new.digest in recorder.evicted and successor.digest in recorder.evicted)


async def test_a_rotation_the_plan_refuses_writes_nothing(backend: Backend) -> None:
    org = new_org()
    old, _, _ = await create(backend.store, org)

    def refuse(_: ApiKey) -> Rotation:
        raise FailedPrecondition("no")

    with pytest.raises(FailedPrecondition):
        await backend.store.rotate_key(org, old.id, ADMIN, NOW, refuse, "")
    assert await backend.store.get_key(org, old.id) == old
    assert (await backend.store.list_keys(org, None, NOW, 0, 10)).total == 1
    assert await backend.store.rotate_key(new_org(), old.id, ADMIN, NOW, refuse, "") is None


async def test_keys_in_their_grace_period_do_not_hold_a_slot(backend: Backend) -> None:
    org = new_org()
    store = backend.store
    first = await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    rotation, _ = successor_of(first, NOW + timedelta(days=1))
    await store.rotate_key(org, first.id, ADMIN, NOW, lambda _: rotation, "")
    with pytest.raises(TooManyActiveKeys):  # 2 hold a slot, the third is in its grace period
        await store.create_key(new_key(org)[0], ADMIN, 2, NOW)
    assert (await store.list_keys(org, KeyState.ACTIVE, NOW, 0, 10)).total == 3


async def test_the_key_limit_holds_under_concurrent_rotations_and_creates(backend: Backend) -> None:
    org = new_org()
    keys = [await backend.store.create_key(new_key(org)[0], ADMIN, 3, NOW) for _ in range(2)]

    async def attempt() -> ApiKey | None:
        try:
            return await backend.store.create_key(new_key(org)[0], ADMIN, 3, NOW)
        except TooManyActiveKeys:
            return None

    async def rotate(key: ApiKey) -> object:
        rotation, _ = successor_of(key, NOW + timedelta(days=1))
        return await backend.store.rotate_key(org, key.id, ADMIN, NOW, lambda _: rotation, "")

    results = await asyncio.gather(*(attempt() for _ in range(6)), *(rotate(k) for k in keys))
    assert sum(r is not None for r in results[:6]) == 1 and all(r is not None for r in results[6:])
    active = (await backend.store.list_keys(org, KeyState.ACTIVE, NOW, 0, 20)).keys
    assert sum(not k.rotated_to for k in active) == 3 and len(active) == 5


async def test_an_update_changes_name_and_labels_only_and_reaches_the_feed(backend: Backend) -> None:
    recorder = await subscribed(backend)
    org = new_org()
    key, new, _ = await create(backend.store, org)
    recorder.evicted.clear()
    updated = await backend.store.update_key(
        org, key.id, ADMIN, NOW, lambda current: KeyUpdate(name="billing", labels=(("tier", "gold"),))
    )
    assert updated is not None and updated[1] == new.digest
    assert (updated[0].name, updated[0].labels, updated[0].scopes) == ("billing", (("tier", "gold"),), key.scopes)
    assert (await backend.store.find_by_digest(new.digest)).key == updated[0]
    await recorder.wait_for(lambda: new.digest in recorder.evicted)
    assert await backend.store.update_key(new_org(), key.id, ADMIN, NOW, lambda c: KeyUpdate("x", ())) is None


async def test_revoking_a_creators_keys_takes_only_theirs_once(backend: Backend) -> None:
    recorder = await subscribed(backend)
    org = new_org()
    store = backend.store
    mine = [await create(store, org) for _ in range(2)]
    expired, _, _ = await create(store, org, expire=NOW - timedelta(seconds=1))
    bobs_new, _ = new_key(org)
    bobs = await store.create_key(replace(bobs_new, created_by="bob"), ADMIN, 10, NOW)
    elsewhere, _, _ = await create(store, new_org())
    recorder.evicted.clear()
    revoked = await store.revoke_keys_created_by(org, "alice", Actor("olivia", Role.OWNER), "left", NOW)
    assert {k.id for k, _ in revoked} == {key.id for key, _, _ in mine}
    assert all(k.revoke_time == NOW and k.revoked_by == "olivia" and k.revoke_reason == "left" for k, _ in revoked)
    await recorder.wait_for(lambda: all(new.digest in recorder.evicted for _, new, _ in mine))
    for key_id, org_id in ((expired.id, org), (bobs.id, org), (elsewhere.id, elsewhere.org_id)):
        found = await store.get_key(org_id, key_id)
        assert found is not None and found.revoke_time is None
    assert await store.revoke_keys_created_by(org, "alice", ADMIN, "again", NOW) == []


# -- the audit trail reads back, filtered and paged ---------------------------


async def test_audit_events_read_back_newest_first_filtered_and_chained(backend: Backend) -> None:
    org, other = new_org(), new_org()
    by_token = Actor("alice", Role.ADMIN, caller="ci-deployer")
    first = await backend.store.create_key(new_key(org)[0], by_token, 10, NOW)
    second = await backend.store.create_key(new_key(org)[0], by_token, 10, NOW)
    await backend.store.revoke_key(org, first.id, by_token, "left the team", NOW)
    await backend.store.create_key(new_key(other)[0], by_token, 10, NOW)
    events = await backend.store.list_audit_events(AuditQuery(org))
    assert [(e.action, e.key_id) for e in events] == [
        ("key.revoke", first.id),
        ("key.create", second.id),
        ("key.create", first.id),
    ]
    newest = events[0]
    assert (newest.org_id, newest.actor, newest.outcome) == (org, by_token, "ok")
    assert newest.detail == {"reason": "left the team"}
    assert newest.time.tzinfo is not None and abs(newest.time - datetime.now(UTC)) < timedelta(minutes=1)
    assert len({e.hash for e in events}) == 3 and all(len(e.hash) == 32 for e in events)
    assert events[0].id > events[1].id > events[2].id
    assert [e.key_id for e in await backend.store.list_audit_events(AuditQuery(org, key_id=first.id))] == [
        first.id,
        first.id,
    ]
    assert [e.action for e in await backend.store.list_audit_events(AuditQuery(org, action="key.revoke"))] == [
        "key.revoke"
    ]
    paged = await backend.store.list_audit_events(AuditQuery(org, before_id=events[0].id, limit=1))
    assert [e.id for e in paged] == [events[1].id]
    later = newest.time + timedelta(microseconds=1)
    assert await backend.store.list_audit_events(AuditQuery(org, start_time=later)) == []
    assert len(await backend.store.list_audit_events(AuditQuery(org, end_time=later))) == 3
    assert await backend.store.list_audit_events(AuditQuery(new_org())) == []


# -- daily usage counts --------------------------------------------------------


async def test_usage_counts_add_up_per_day_next_to_last_used(backend: Backend) -> None:
    key, _, _ = await create(backend.store, new_org())
    other, _, _ = await create(backend.store, new_org())
    day = date(2026, 3, 1)
    used = NOW + timedelta(seconds=5)
    await backend.store.record_last_used({key.id: used}, {(key.id, day): (3, 1, 0), (other.id, day): (1, 0, 0)})
    await backend.store.record_last_used({}, {(key.id, day): (2, 0, 4), (key.id, day + timedelta(days=1)): (1, 0, 0)})
    assert await backend.store.key_usage(key.id, day - timedelta(days=5), day + timedelta(days=5)) == {
        day: (5, 1, 4),
        day + timedelta(days=1): (1, 0, 0),
    }
    assert await backend.store.key_usage(key.id, day + timedelta(days=1), day + timedelta(days=1)) == {
        day + timedelta(days=1): (1, 0, 0)
    }
    assert await backend.store.key_usage(other.id, day, day) == {day: (1, 0, 0)}
    stored = await backend.store.get_key(key.org_id, key.id)
    assert stored is not None and stored.last_used_time == used


def test_both_stores_are_under_contract() -> None:
    """A new store joins the ``backend`` fixture's params; these are the ports it must implement."""
    methods: Mapping[str, object] = {m: getattr(KeyStore, m) for m in dir(KeyStore) if not m.startswith("_")}
    for store in (InMemoryStore, PostgresStore):
        assert all(callable(getattr(store, name, None)) for name in methods), store
    assert isinstance(Page([], 0), Page)
