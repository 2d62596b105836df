"""The core: key lifecycle and Authorize over a ``Store``.

Transports (the gRPC KeyService, the Envoy Check adapter) translate their
messages into calls here and back, and do nothing else. Nothing in this
module imports grpc or asyncpg.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from authsvc import validation
from authsvc.cache import MISS, KeyCache
from authsvc.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from authsvc.keyformat import KeyFormat, digest
from authsvc.keys import Actor, ApiKey, Decision, KeyGrant, Reason, ScopeCatalog, decide
from authsvc.metrics import NO_METRICS, Recorder
from authsvc.ratelimit import RateLimiter
from authsvc.storage import NewKey, Page, Store, TooManyActiveKeys
from authsvc.usage import UsageRecorder

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _failure_reason(exc: Exception) -> str:
    """An Authorize that raised is counted with the decisions, under its gRPC code's name."""
    if isinstance(exc, Unavailable):
        return "unavailable"
    if isinstance(exc, InvalidArgument):
        return "invalid_argument"
    return "internal"


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"CreatedKey(key={self.key!r}, secret=<redacted>)"


class KeyService:
    """Create, get, list, revoke and authorize API keys.

    ``cache``, ``usage`` and ``limiter`` are optional so the core can be
    exercised alone; the server always wires all three.
    """

    def __init__(
        self,
        store: Store,
        catalog: ScopeCatalog,
        key_format: KeyFormat,
        *,
        max_active_keys: int = 10,
        cache: KeyCache | None = None,
        usage: UsageRecorder | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Recorder = NO_METRICS,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.key_format = key_format
        self.max_active_keys = max_active_keys
        self.cache = cache
        self.usage = usage
        self.limiter = limiter
        self._clock = clock
        self._metrics = metrics

    # -- management -------------------------------------------------------

    async def create_key(
        self,
        org_id: str,
        actor: Actor,
        name: str,
        scopes: Sequence[str],
        expire_time: datetime | None,
        rate_limit: int = 0,
    ) -> CreatedKey:
        now = self._clock()
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor)
        name = self._no_key_in("name", validation.name(name))
        granted = validation.scopes(scopes, self.catalog)
        expire_time = validation.expire_time(expire_time, now)
        rate_limit = validation.rate_limit(rate_limit)
        await self._require_manager(actor, "key.create", org_id)
        issued = self.key_format.generate()
        try:
            key = await self.store.create_key(
                NewKey(
                    org_id=org_id,
                    name=name,
                    prefix=issued.display_prefix,
                    digest=issued.digest,
                    scopes=granted,
                    created_by=actor.user_id,
                    expire_time=expire_time,
                    rate_limit=rate_limit,
                ),
                actor,
                self.max_active_keys,
                now,
            )
        except TooManyActiveKeys:
            await self.store.audit("key.create", org_id, actor, None, "limit_reached", {"name": name})
            raise ResourceExhausted(
                f"organization {org_id} already has {self.max_active_keys} active keys; "
                "revoke unused keys before creating new ones"
            ) from None
        if self.cache is not None:
            self.cache.invalidate(issued.digest)
        log.info(
            "key created", extra={"org_id": org_id, "key_id": key.id, "key_prefix": key.prefix, "actor": actor.user_id}
        )
        return CreatedKey(key=key, secret=issued.secret)

    async def get_key(self, org_id: str, actor: Actor, key_id: str) -> ApiKey:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor)
        key_id = validation.key_id(key_id)
        await self._require_member(actor, "key.get", org_id, key_id)
        key = await self.store.get_key(org_id, key_id)
        await self.store.audit("key.get", org_id, actor, key_id, "ok" if key else "not_found", {})
        if key is None:
            raise NotFound(f"no key {key_id} in organization {org_id}")
        return key

    async def list_keys(
        self, org_id: str, actor: Actor, page: int, limit: int, state: int | None
    ) -> tuple[Page, int, int]:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor)
        page, limit = validation.page_and_limit(page, limit)
        wanted = validation.state(state)
        await self._require_member(actor, "key.list", org_id)
        result = await self.store.list_keys(org_id, wanted, self._clock(), (page - 1) * limit, limit)
        await self.store.audit(
            "key.list",
            org_id,
            actor,
            None,
            "ok",
            {"page": page, "limit": limit, "state": wanted.name if wanted else None},
        )
        return result, page, limit

    async def revoke_key(self, org_id: str, actor: Actor, key_id: str, reason: str) -> ApiKey:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor)
        key_id = validation.key_id(key_id)
        reason = self._no_key_in("reason", validation.reason(reason))
        await self._require_manager(actor, "key.revoke", org_id, key_id)
        revoked = await self.store.revoke_key(org_id, key_id, actor, reason, self._clock())
        if revoked is None:
            await self.store.audit("key.revoke", org_id, actor, key_id, "not_found", {})
            raise NotFound(f"no key {key_id} in organization {org_id}")
        key, key_digest = revoked
        # Evict here at once so the very next Authorize in this process
        # denies; other processes evict on the store's notification.
        if self.cache is not None:
            self.cache.invalidate(key_digest)
        log.info(
            "key revoked", extra={"org_id": org_id, "key_id": key.id, "key_prefix": key.prefix, "actor": actor.user_id}
        )
        return key

    def _check_org(self, org_id: str) -> str:
        return self._no_key_in("org_id", validation.org_id(org_id))

    def _check_actor(self, actor: Actor) -> Actor:
        user_id = self._no_key_in("actor.user_id", validation.actor_user_id(actor.user_id))
        return Actor(user_id=user_id, role=validation.role(actor.role))

    def _no_key_in(self, field: str, value: str) -> str:
        """Free-form fields are stored, audited and logged: a key pasted into one would leak."""
        if self.key_format.appears_in(value):
            raise InvalidArgument(
                f"{field} holds an API key; pass the intended value (and revoke that key if it was shared)"
            )
        return value

    async def _require_member(self, actor: Actor, action: str, org_id: str, key_id: str | None = None) -> None:
        if actor.role == 0:
            await self.store.audit(action, org_id, actor, key_id, "denied", {})
            raise PermissionDenied("actor.role must be set (ROLE_MEMBER, ROLE_ADMIN or ROLE_OWNER)")

    async def _require_manager(self, actor: Actor, action: str, org_id: str, key_id: str | None = None) -> None:
        if not actor.role.may_manage:
            await self.store.audit(action, org_id, actor, key_id, "denied", {})
            raise PermissionDenied("only ROLE_ADMIN or ROLE_OWNER may create or revoke keys")

    # -- the hot path -----------------------------------------------------

    async def authorize(self, key: str, required_scope: str, transport: str = "grpc") -> Decision:
        """Decide whether ``key`` may act with ``required_scope``.

        Raises ``InvalidArgument`` for an unknown required scope (a caller
        bug) and ``Unavailable`` when the key is not cached and the store
        cannot be reached: never an allow for a key that was not verified.
        ``transport`` only labels the metrics (grpc, envoy_grpc, ...).
        """
        start = time.perf_counter()
        try:
            decision, cached = await self._authorize(key, required_scope)
        except Exception as exc:
            self._metrics.failed(_failure_reason(exc), transport, time.perf_counter() - start)
            raise
        self._metrics.decided(decision.reason, transport, cached, time.perf_counter() - start)
        return decision

    async def _authorize(self, key: str, required_scope: str) -> tuple[Decision, bool | None]:
        """The decision, and whether the key came from the cache (None: no lookup was needed)."""
        self.catalog.check_required(required_scope)
        if not key:
            return Decision(Reason.MISSING_KEY), None
        if not self.key_format.is_well_formed(key):
            return Decision(Reason.MALFORMED_KEY), None
        key_digest = digest(key)
        cache = self.cache
        grant: KeyGrant | None
        cached = cache.get(key_digest) if cache is not None else MISS
        hit = cached is not MISS
        if not hit:
            epoch = cache.epoch if cache is not None else 0
            record = await self.store.find_by_digest(key_digest)
            grant = KeyGrant.of(record, self.catalog) if record is not None else None
            if cache is not None:
                cache.put(key_digest, grant, epoch)
        else:
            grant = cached  # type: ignore[assignment]  # MISS ruled out above
        now = time.time()
        decision = decide(grant, required_scope, now)
        if grant is None or decision.reason in (Reason.REVOKED, Reason.EXPIRED):
            return decision, hit
        if self.usage is not None:
            self.usage.touch(grant.principal.key_id, now)
        limiter = self.limiter
        if decision.allowed and limiter is not None and (grant.rate_limit or limiter.default_limit):
            return await limiter.apply(decision, grant.rate_limit, now), hit
        return decision, hit
