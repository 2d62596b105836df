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
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from authsvc.core.keys import Actor, ApiKey, KeyState
from authsvc.core.ports import FeedSubscriber, Found, NewKey, Page, TooManyActiveKeys


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
        self._lock = asyncio.Lock()

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        async with self._lock:  # the limit is checked and the key inserted as one step
            active = sum(1 for k in self._keys.values() if k.org_id == new.org_id and k.state(now) is KeyState.ACTIVE)
            if active >= max_active:
                raise TooManyActiveKeys
            key = self.insert(new, now)
            self.audit_rows.append(
                AuditRow(
                    "key.create",
                    new.org_id,
                    actor,
                    key.id,
                    "ok",
                    {"name": new.name, "scopes": list(new.scopes), "prefix": new.prefix},
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
                self.audit_rows.append(
                    AuditRow("key.revoke", org_id, actor, key_id, "already_revoked", {"reason": reason})
                )
                return key, key_digest
            key = replace(key, revoke_time=now, revoked_by=actor.user_id, revoke_reason=reason)
            self._keys[key_id] = key
            self.audit_rows.append(AuditRow("key.revoke", org_id, actor, key_id, "ok", {"reason": reason}))
            self.feed.publish(key_digest)
            return key, key_digest

    async def find_by_digest(self, digest: bytes) -> Found:
        key_id = self._by_digest.get(digest)
        return Found(self._keys[key_id] if key_id is not None else None)

    async def record_last_used(self, used: Mapping[str, datetime]) -> None:
        for key_id, at in used.items():
            key = self._keys.get(key_id)
            if key is not None and (key.last_used_time is None or key.last_used_time < at):
                self._keys[key_id] = replace(key, last_used_time=at)

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        self.audit_rows.append(AuditRow(action, org_id, actor, key_id, outcome, dict(detail)))

    async def ping(self, budget: float = 1.0) -> bool:
        return True
