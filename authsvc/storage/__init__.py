"""The store interface the core depends on; ``postgres`` implements it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from authsvc.keys import Actor, ApiKey, KeyState


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


@dataclass(frozen=True, slots=True)
class Page:
    keys: list[ApiKey]
    total: int


class Found(NamedTuple):
    """A hot-path lookup's answer: the key (``None``: no such key) and the server it was read from.

    ``source`` is opaque to the core; the cache stores the answer only when
    it is the server whose notifications the cache follows.
    """

    key: ApiKey | None
    source: object = None


class TooManyActiveKeys(Exception):
    """Raised by ``create_key`` when the organization is at its limit; nothing was written."""


class Store(Protocol):
    """Persistence for keys and their audit trail.

    Every method either completes or leaves nothing behind. Connection
    failures and timeouts surface as ``authsvc.errors.Unavailable``.
    """

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        """Insert the key unless the org already has ``max_active`` active keys, atomically."""

    async def get_key(self, org_id: str, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, org_id: str, state: KeyState | None, now: datetime, offset: int, limit: int) -> Page: ...

    async def revoke_key(
        self, org_id: str, key_id: str, actor: Actor, reason: str, now: datetime
    ) -> tuple[ApiKey, bytes] | None:
        """Revoke once; a revoked key is returned unchanged, with its digest for cache eviction.

        ``None``: no such key in the organization.
        """

    async def find_by_digest(self, digest: bytes) -> Found:
        """The hot-path lookup; bounded by the store's lookup timeout."""

    async def record_last_used(self, used: Mapping[str, datetime]) -> None:
        """Move ``last_used_time`` forward (never backwards) for many keys in one statement."""

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        """Record a management call that wrote nothing else (reads, denials)."""
