"""What the core needs from the outside world, as small protocols.

The core (``Authorizer``, ``KeyManager``) is written against these and
nothing else; ``authsvc.storage`` implements them on PostgreSQL (asyncpg,
LISTEN/NOTIFY) and in memory, and ``authsvc.storage.redis`` implements the
shared rate-limit counter. Every implementation passes the same contract
suite (``tests/storage/test_contract.py``).

Two ports carry the correctness of the cache:

* ``KeyStore.find_by_digest`` is the hot path's only read;
* ``InvalidationFeed`` tells a ``FeedSubscriber`` (the decision cache) which
  keys' answers may have changed, proves with heartbeats that nothing was
  missed, and says when it lost its source, so the cache can stop serving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import NamedTuple, Protocol

from authsvc.core.keys import Actor, ApiKey, KeyState, Reason

#: Wall-clock time as a POSIX timestamp (key expiry, rate-limit windows, last use).
WallClock = Callable[[], float]
#: Wall-clock time as an aware datetime (what management calls store).
DateClock = Callable[[], datetime]
#: Monotonic seconds (cache freshness, back-offs): never jumps with the wall clock.
Monotonic = Callable[[], float]


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key about to be stored: metadata plus the digest, never the secret."""

    org_id: str
    name: str
    prefix: str
    digest: bytes
    scopes: tuple[str, ...]
    created_by: str
    expire_time: datetime | None
    rate_limit: int
    labels: tuple[tuple[str, str], ...] = ()
    #: Set by a rotation: the id of the key this one replaces.
    rotated_from: str = ""


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation writes, decided by the core from the old key as the store read it (locked)."""

    successor: NewKey
    #: When the old key stops working: the end of the grace period, or its own expiry if earlier.
    old_expire_time: datetime


@dataclass(frozen=True, slots=True)
class Rotated:
    key: ApiKey
    previous: ApiKey
    #: Both digests, for cache eviction: the old key's expiry changed, and the new one may be cached as unknown.
    digests: tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """A key's new name and labels, decided by the core from the key as the store read it (locked)."""

    name: str
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Page:
    keys: list[ApiKey]
    total: int


#: One key's Authorize answers on one UTC day: (allowed, denied for scope, rate limited).
UsageCounts = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One stored audit row, as ``ListAuditEvents`` shows it."""

    id: int
    time: datetime
    org_id: str
    actor: Actor
    action: str
    key_id: str | None
    outcome: str
    detail: Mapping[str, object]
    #: The event's link in its organization's hash chain.
    hash: bytes


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which of an organization's audit events to read, newest first.

    ``before_id``: only events with a smaller id (the page token's position);
    ids grow in chain order within an organization. ``start_time`` is
    inclusive, ``end_time`` exclusive.
    """

    org_id: str
    key_id: str | None = None
    action: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    before_id: int | None = None
    limit: int = 50


#: Bytes of a stored digest that ``KeyStore.key_prefixes`` returns (``authsvc.core.known``'s table holds them).
PREFIX_BYTES = 4


class PrefixPage(NamedTuple):
    """A page of stored digests' prefixes (``KeyStore.key_prefixes``) and the server it was read from (as ``Found``).

    ``prefixes`` is ``PREFIX_BYTES`` bytes per digest, concatenated: one
    bytes object, not a list, so that a page of 20,000 costs the event loop
    no per-row work.
    """

    prefixes: bytes
    source: object = None


class Found(NamedTuple):
    """A hot-path lookup's answer: the key (``None``: no such key) and the server it was read from.

    ``source`` is opaque to the core; the cache stores the answer only when
    it is the server whose invalidations the cache follows (see
    ``FeedSubscriber.synchronised``). A store with one server passes ``None``.
    """

    key: ApiKey | None
    source: object = None


class TooManyActiveKeys(Exception):
    """Raised by ``create_key`` when the organization is at its limit; nothing was written.

    Active keys in a rotation's grace period (``rotated_to`` set) do not count.
    """


class KeyStore(Protocol):
    """Persistence for keys and their audit trail.

    Every method either completes or leaves nothing behind. Connection
    failures and timeouts surface as ``authsvc.core.errors.Unavailable``.
    Every write that can change an Authorize answer (create, revoke, rotate,
    update, bulk revoke) is
    published to the store's ``InvalidationFeed`` as part of the write itself.
    Every audit row a method writes (``create_key``, ``revoke_key``,
    ``audit``) records ``actor.caller``, the authenticated caller's name,
    next to the asserted actor.
    """

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        """Insert the key unless the org already has ``max_active`` active keys, atomically."""
        ...

    async def get_key(self, org_id: str, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, org_id: str, state: KeyState | None, now: datetime, offset: int, limit: int) -> Page: ...

    async def revoke_key(
        self, org_id: str, key_id: str, actor: Actor, reason: str, now: datetime
    ) -> tuple[ApiKey, bytes] | None:
        """Revoke once; a revoked key is returned unchanged, with its digest for cache eviction.

        ``None``: no such key in the organization.
        """
        ...

    async def rotate_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, plan: Callable[[ApiKey], Rotation], reason: str
    ) -> Rotated | None:
        """Replace a key, atomically: the old key is read and locked, ``plan(old)`` decides (or raises,
        and nothing is written), then the successor is inserted with ``rotated_from``, the old key gets
        ``rotated_to`` and its new expiry, an audit row is written and both digests are published.

        A rotated key no longer counts toward ``create_key``'s ``max_active``.
        ``None``: no such key in the organization.
        """
        ...

    async def update_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, change: Callable[[ApiKey], KeyUpdate]
    ) -> tuple[ApiKey, bytes] | None:
        """Rename or relabel a key, atomically: read and locked, ``change(key)`` decides (or raises),
        written with its audit row, and its digest published (the Principal changed).

        ``None``: no such key in the organization.
        """
        ...

    async def revoke_keys_created_by(
        self, org_id: str, created_by: str, actor: Actor, reason: str, now: datetime
    ) -> list[tuple[ApiKey, bytes]]:
        """Revoke every active key ``created_by`` made in the organization, in one transaction.

        Each key gets its audit row and its published digest; the call one
        summary row. Returns the keys revoked now (none on a repeat).
        """
        ...

    async def find_by_digest(self, digest: bytes) -> Found:
        """The hot-path lookup, with the server it read from; bounded by the store's lookup timeout."""
        ...

    async def key_prefixes(self, start: bytes, limit: int) -> PrefixPage:
        """The first ``PREFIX_BYTES`` bytes of the ``limit`` smallest stored digests that are ``>= start``
        (every key, whatever its state), in no promised order. The pages of
        ``authsvc.core.known.KnownDigests``' load (``start=b""`` for the first)."""
        ...

    async def record_last_used(
        self, used: Mapping[str, datetime], counts: Mapping[tuple[str, date], UsageCounts] | None = None
    ) -> None:
        """Move ``last_used_time`` forward (never backwards) for many keys and add ``counts`` to
        their daily usage, all in one statement (one per flush per process)."""
        ...

    async def key_usage(self, key_id: str, first: date, last: date) -> dict[date, UsageCounts]:
        """The key's stored daily counts from ``first`` to ``last`` (UTC days, inclusive); days without calls absent."""
        ...

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        """Record a management call that wrote nothing else (reads, denials)."""
        ...

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """At most ``query.limit`` of the organization's events matching ``query``, highest id first."""
        ...

    async def ping(self, budget: float = 1.0) -> bool:
        """Whether the store answers within ``budget`` seconds (health)."""
        ...


class FeedSubscriber(Protocol):
    """What an invalidation feed tells its subscriber (``authsvc_client._cache.DecisionCache`` is one)."""

    def evict(self, digest: bytes) -> None:
        """The answer for this key digest may have changed."""

    def clear(self) -> None:
        """Something changed that cannot be pinned to one key: forget everything."""

    def alive(self, sent_at: float) -> None:
        """Every change committed before ``sent_at`` (monotonic) has been delivered."""

    def synchronised(self, at: float, source: object = None, alive: Callable[[], bool] | None = None) -> None:
        """Subscribed (again) to server ``source`` as of ``at``: changes may have been missed before it.

        ``alive``, when given, tells at any moment whether the subscription's connection is still open.
        """

    def desynchronised(self) -> None:
        """The feed is lost: nothing it said may be relied on until ``synchronised``."""


class InvalidationFeed(Protocol):
    """The stream of key changes a store publishes, delivered to its subscribers in commit order."""

    def subscribe(self, subscriber: FeedSubscriber) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class SharedCounter(Protocol):
    """A counter shared by every process (Redis): rate limits hold across replicas."""

    async def incr(self, name: str, ttl_seconds: int) -> int: ...

    async def close(self) -> None: ...


class Recorder(Protocol):
    """What the core, the stores and the transports report; ``authsvc.metrics.Metrics`` counts it.

    Labels are fixed vocabularies only (reasons, transports, operations,
    gRPC code names): never a key, a prefix, a key id, an org or a user.
    """

    def decided(self, reason: Reason, transport: str, cached: bool | None, seconds: float) -> None:
        """An Authorize answer; ``cached``: True from the cache, False from the store, None without a lookup."""

    def failed(self, reason: str, transport: str, seconds: float) -> None:
        """An Authorize that raised (``unavailable``, ``invalid_argument``): counted with the decisions."""

    def invalidated(self, lag_seconds: float) -> None: ...

    def feed_reset(self) -> None: ...

    def lookup_batch(self, size: int) -> None: ...

    def store_error(self, operation: str) -> None: ...

    def managed(self, method: str, code: str) -> None: ...

    def usage_dropped(self, entries: int) -> None:
        """Usage-report entries not counted: no digest, no stored key's, under another id, or not checked yet."""


class NoMetrics:
    """The recorder when metrics are off (and in tests of the core alone)."""

    def decided(self, reason: Reason, transport: str, cached: bool | None, seconds: float) -> None:
        pass

    def failed(self, reason: str, transport: str, seconds: float) -> None:
        pass

    def invalidated(self, lag_seconds: float) -> None:
        pass

    def feed_reset(self) -> None:
        pass

    def lookup_batch(self, size: int) -> None:
        pass

    def store_error(self, operation: str) -> None:
        pass

    def managed(self, method: str, code: str) -> None:
        pass

    def usage_dropped(self, entries: int) -> None:
        pass


NO_METRICS = NoMetrics()
