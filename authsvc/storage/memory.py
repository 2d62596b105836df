"""``KeyStore`` and ``InvalidationFeed`` in process memory.

For unit tests of the core and for trying the core in a Python process
without a database (nothing is kept). It keeps
every promise the PostgreSQL store keeps (the storage contract suite runs
against both): the key limit holds under concurrent creates, scopes never
change, a revocation is final, ``last_used_time`` never moves backwards, and
every create and revoke is delivered to the feed's subscribers as part of
the write.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

from authsvc.core.keys import Actor, ApiKey, KeyState
from authsvc.core.ports import (
    PREFIX_BYTES,
    AuditEvent,
    AuditQuery,
    FeedSubscriber,
    Found,
    KeyUpdate,
    NewKey,
    Page,
    PrefixPage,
    Rotated,
    Rotation,
    TooManyActiveKeys,
    UsageCounts,
)


@dataclass(frozen=True, slots=True)
class AuditRow:
    action: str
    org_id: str
    actor: Actor
    key_id: str | None
    outcome: str
    detail: Mapping[str, object]


class InMemoryFeed:
    """Delivers the store's changes at once; ``lose()`` and ``restore()`` stand for a lost and a new subscription."""

    def __init__(self) -> None:
        self._subscribers: list[FeedSubscriber] = []
        self._running = False
        self._heartbeat: asyncio.Task[None] | None = None

    def subscribe(self, subscriber: FeedSubscriber) -> None:
        self._subscribers.append(subscriber)

    async def start(self) -> None:
        self._running = True
        self.restore()
        self._heartbeat = asyncio.create_task(self._beat(), name="authsvc-memory-feed")

    async def stop(self) -> None:
        self._running = False
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.lose()

    def publish(self, key_digest: bytes) -> None:
        for subscriber in self._subscribers:
            subscriber.evict(key_digest)

    def lose(self) -> None:
        for subscriber in self._subscribers:
            subscriber.desynchronised()

    def restore(self) -> None:
        now = time.monotonic()
        for subscriber in self._subscribers:
            subscriber.synchronised(now)

    async def _beat(self) -> None:
        # Nothing can be missed in one process, but subscribers still want
        # proof of life to keep serving: the same contract as a real feed.
        while self._running:
            now = time.monotonic()
            for subscriber in self._subscribers:
                subscriber.alive(now)
            await asyncio.sleep(0.05)


class InMemoryStore:
    def __init__(self, feed: InMemoryFeed | None = None) -> None:
        self.feed = feed if feed is not None else InMemoryFeed()
        self._keys: dict[str, ApiKey] = {}
        self._digests: dict[str, bytes] = {}
        self._by_digest: dict[bytes, str] = {}
        self.audit_rows: list[AuditRow] = []
        self._events: list[AuditEvent] = []
        self._heads: dict[str, bytes] = {}
        self._usage: dict[tuple[str, date], UsageCounts] = {}
        self._lock = asyncio.Lock()

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        async with self._lock:  # the limit is checked and the key inserted as one step
            active = sum(
                1
                for k in self._keys.values()
                if k.org_id == new.org_id and k.state(now) is KeyState.ACTIVE and not k.rotated_to
            )
            if active >= max_active:
                raise TooManyActiveKeys
            key = self.insert(new, now)
            self._record(
                AuditRow(
                    "key.create",
                    new.org_id,
                    actor,
                    key.id,
                    "ok",
                    {"name": new.name, "scopes": list(new.scopes), "prefix": new.prefix, "labels": dict(new.labels)},
                )
            )
            return key

    def insert(self, new: NewKey, now: datetime) -> ApiKey:
        """Store a key as it is, limit unchecked and unaudited, and publish it (seeding demos and tests)."""
        key = ApiKey(
            id=str(uuid.uuid4()),
            org_id=new.org_id,
            name=new.name,
            prefix=new.prefix,
            scopes=tuple(new.scopes),
            created_by=new.created_by,
            create_time=now,
            expire_time=new.expire_time,
            rate_limit=new.rate_limit,
            labels=new.labels,
            rotated_from=new.rotated_from,
        )
        self._keys[key.id] = key
        self._digests[key.id] = new.digest
        self._by_digest[new.digest] = key.id
        self.feed.publish(new.digest)
        return key

    async def get_key(self, org_id: str, key_id: str) -> ApiKey | None:
        key = self._keys.get(key_id)
        return key if key is not None and key.org_id == org_id else None

    async def list_keys(self, org_id: str, state: KeyState | None, now: datetime, offset: int, limit: int) -> Page:
        keys = [k for k in self._keys.values() if k.org_id == org_id and (state is None or k.state(now) is state)]
        keys.sort(key=lambda k: (k.create_time, k.id), reverse=True)
        return Page(keys=keys[offset : offset + limit], total=len(keys))

    async def revoke_key(
        self, org_id: str, key_id: str, actor: Actor, reason: str, now: datetime
    ) -> tuple[ApiKey, bytes] | None:
        async with self._lock:
            key = await self.get_key(org_id, key_id)
            if key is None:
                return None
            key_digest = self._digests[key_id]
            if key.revoke_time is not None:  # final: the first revocation stands
                self._record(AuditRow("key.revoke", org_id, actor, key_id, "already_revoked", {"reason": reason}))
                return key, key_digest
            key = replace(key, revoke_time=now, revoked_by=actor.user_id, revoke_reason=reason)
            self._keys[key_id] = key
            self._record(AuditRow("key.revoke", org_id, actor, key_id, "ok", {"reason": reason}))
            self.feed.publish(key_digest)
            return key, key_digest

    async def rotate_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, plan: Callable[[ApiKey], Rotation], reason: str
    ) -> Rotated | None:
        async with self._lock:
            old = await self.get_key(org_id, key_id)
            if old is None:
                return None
            rotation = plan(old)  # raises before anything is written
            key = self.insert(rotation.successor, now)
            previous = replace(old, rotated_to=key.id, expire_time=rotation.old_expire_time)
            self._keys[key_id] = previous
            self._record(
                AuditRow(
                    "key.rotate",
                    org_id,
                    actor,
                    key_id,
                    "ok",
                    {
                        "rotated_to": key.id,
                        "prefix": key.prefix,
                        "old_expire_time": rotation.old_expire_time.isoformat(),
                        "reason": reason,
                    },
                )
            )
            self._record(
                AuditRow(
                    "key.create",
                    org_id,
                    actor,
                    key.id,
                    "ok",
                    {"name": key.name, "scopes": list(key.scopes), "prefix": key.prefix, "rotated_from": key_id},
                )
            )
            old_digest = self._digests[key_id]
            self.feed.publish(old_digest)
            return Rotated(key=key, previous=previous, digests=(old_digest, rotation.successor.digest))

    async def update_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, change: Callable[[ApiKey], KeyUpdate]
    ) -> tuple[ApiKey, bytes] | None:
        async with self._lock:
            current = await self.get_key(org_id, key_id)
            if current is None:
                return None
            update = change(current)
            key = replace(current, name=update.name, labels=update.labels)
            self._keys[key_id] = key
            self._record(
                AuditRow(
                    "key.update", org_id, actor, key_id, "ok", {"name": update.name, "labels": dict(update.labels)}
                )
            )
            digest = self._digests[key_id]
            self.feed.publish(digest)
            return key, digest

    async def revoke_keys_created_by(
        self, org_id: str, created_by: str, actor: Actor, reason: str, now: datetime
    ) -> list[tuple[ApiKey, bytes]]:
        async with self._lock:
            revoked: list[tuple[ApiKey, bytes]] = []
            for key in list(self._keys.values()):
                if key.org_id == org_id and key.created_by == created_by and key.state(now) is KeyState.ACTIVE:
                    key = replace(key, revoke_time=now, revoked_by=actor.user_id, revoke_reason=reason)
                    self._keys[key.id] = key
                    revoked.append((key, self._digests[key.id]))
            revoked.sort(key=lambda pair: (pair[0].create_time, pair[0].id), reverse=True)
            for key, digest in revoked:
                self._record(
                    AuditRow("key.revoke", org_id, actor, key.id, "ok", {"reason": reason, "created_by": created_by})
                )
                self.feed.publish(digest)
            self._record(
                AuditRow(
                    "key.revoke_created_by",
                    org_id,
                    actor,
                    None,
                    "ok",
                    {"created_by": created_by, "reason": reason, "revoked": [key.id for key, _ in revoked]},
                )
            )
            return revoked

    async def find_by_digest(self, digest: bytes) -> Found:
        key_id = self._by_digest.get(digest)
        return Found(self._keys[key_id] if key_id is not None else None)

    async def key_prefixes(self, start: bytes, limit: int) -> PrefixPage:
        return PrefixPage(b"".join(d[:PREFIX_BYTES] for d in sorted(d for d in self._by_digest if d >= start)[:limit]))

    async def record_last_used(
        self, used: Mapping[str, datetime], counts: Mapping[tuple[str, date], UsageCounts] | None = None
    ) -> None:
        for (key_id, day), (allowed, denied, limited) in (counts or {}).items():
            a, d, r = self._usage.get((key_id, day), (0, 0, 0))
            self._usage[(key_id, day)] = (a + allowed, d + denied, r + limited)
        for key_id, at in used.items():
            key = self._keys.get(key_id)
            if key is not None and (key.last_used_time is None or key.last_used_time < at):
                self._keys[key_id] = replace(key, last_used_time=at)

    async def key_usage(self, key_id: str, first: date, last: date) -> dict[date, UsageCounts]:
        return {day: c for (k, day), c in self._usage.items() if k == key_id and first <= day <= last}

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        self._record(AuditRow(action, org_id, actor, key_id, outcome, dict(detail)))

    def _record(self, row: AuditRow) -> None:
        """Keep the row, with an id, a time and its link in the org's hash chain (like the database's trigger)."""
        self.audit_rows.append(row)
        event_id = len(self._events) + 1
        at = datetime.now(UTC)
        previous = self._heads.get(row.org_id, bytes(32))
        canonical = json.dumps(
            [
                event_id,
                at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                row.org_id,
                row.actor.user_id,
                row.actor.role.name.lower(),
                row.actor.caller,
                row.action,
                row.key_id,
                row.outcome,
                row.detail,
            ],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(previous + canonical.encode()).digest()
        self._heads[row.org_id] = digest
        self._events.append(
            AuditEvent(
                event_id, at, row.org_id, row.actor, row.action, row.key_id, row.outcome, dict(row.detail), digest
            )
        )

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        found: list[AuditEvent] = []
        for event in reversed(self._events):
            if len(found) >= query.limit:
                break
            if (
                event.org_id == query.org_id
                and (query.before_id is None or event.id < query.before_id)
                and (query.key_id is None or event.key_id == query.key_id)
                and (query.action is None or event.action == query.action)
                and (query.start_time is None or event.time >= query.start_time)
                and (query.end_time is None or event.time < query.end_time)
            ):
                found.append(event)
        return found

    async def ping(self, budget: float = 1.0) -> bool:
        return True
