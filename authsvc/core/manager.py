"""The key lifecycle: create, get, list, revoke, rotate, update and offboard, with validation, roles,
the key limit and audit.

The gRPC KeyService adapter translates its messages into calls here and
back, and does nothing else. Every input is checked before anything is
written, so a refused call leaves nothing behind; every refused or
permitted call is audited.

What depends on a key's current state (may it be rotated, updated?) is
decided here too, by functions the store calls on the key it has read and
locked (``Rotation``, ``KeyUpdate``), so the rule lives once and no race
can slip between the check and the write.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from authsvc.core import keyformat, pagetoken, validation
from authsvc.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from authsvc.core.keyformat import DISPLAY_PREFIX_LENGTH, KeyFormat
from authsvc.core.keys import ANONYMOUS, Actor, ApiKey, Caller, KeyState, Role, ScopeCatalog
from authsvc.core.ports import (
    AuditEvent,
    AuditQuery,
    DateClock,
    KeyStore,
    KeyUpdate,
    NewKey,
    Page,
    Rotation,
    TooManyActiveKeys,
    UsageCounts,
)
from authsvc.core.ratelimit import RateLimiter

#: ListAuditEvents' page size when the request names none, and the most it may ask for.
DEFAULT_AUDIT_PAGE_SIZE = 50
MAX_AUDIT_PAGE_SIZE = 500
#: An audit action as the trail writes them (``key.create``, ``audit.list``).
_ACTION = re.compile(r"[a-z][a-z_]{0,31}(\.[a-z][a-z_]{0,31}){0,3}")

#: GetKeyUsage's day count when the request names none, and the most it may ask for.
DEFAULT_USAGE_DAYS = 30
MAX_USAGE_DAYS = 90

#: ReportLeakedKeys: keys per call, and calls per caller address per minute. A call looks up at most
#: 100 keys, so one address probes at most 1,000 keys a minute: far fewer than Authorize answers.
MAX_LEAKED_KEYS = 100
LEAK_REPORTS_PER_MINUTE = 10
MAX_LEAK_SOURCE_LENGTH = 200
MAX_LEAK_URL_LENGTH = 500
#: ``revoked_by`` and the audit actor of a revocation by leak report.
LEAK_REPORTER = Actor(user_id="leak-report", role=Role.UNSPECIFIED)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    #: ``(UTC day, counts)`` for every day asked for, oldest first, zeros included.
    days: list[tuple[date, UsageCounts]]
    last_used_time: datetime | None


@dataclass(frozen=True, slots=True)
class LeakReport:
    revoked: int
    already_revoked: int
    unknown: int


#: The longest grace period a rotation may give the old key, unless configured (AUTHSVC_MAX_ROTATION_GRACE).
DEFAULT_MAX_ROTATION_GRACE = timedelta(days=7)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"CreatedKey(key={self.key!r}, secret=<redacted>)"


@dataclass(frozen=True, slots=True)
class RotatedKey:
    key: ApiKey
    secret: str
    #: The old key as it is now: ``rotated_to`` set, ``expire_time`` at the end of its grace period.
    previous: ApiKey

    def __repr__(self) -> str:
        return f"RotatedKey(key={self.key!r}, secret=<redacted>, previous={self.previous!r})"


class KeyManager:
    """Create, get, list and revoke API keys on behalf of an organization's members.

    ``evict`` forgets a key in this process's decision cache right after a
    write (``Authorizer.evict``), so the very next Authorize here sees it;
    other processes hear of it through the store's invalidation feed.
    """

    def __init__(
        self,
        store: KeyStore,
        catalog: ScopeCatalog,
        key_format: KeyFormat,
        *,
        clock: DateClock,
        max_active_keys: int = 10,
        max_rotation_grace: timedelta = DEFAULT_MAX_ROTATION_GRACE,
        evict: Callable[[bytes], None] = lambda digest: None,
        leak_limiter: RateLimiter | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.key_format = key_format
        self.max_active_keys = max_active_keys
        self.max_rotation_grace = max_rotation_grace
        self.now = clock
        self._evict = evict
        # Without a shared counter (Redis), each process counts its own reports.
        self._leak_limiter = leak_limiter or RateLimiter(LEAK_REPORTS_PER_MINUTE, 60, monotonic=time.monotonic)

    async def create_key(
        self,
        org_id: str,
        actor: Actor,
        name: str,
        scopes: Sequence[str],
        expire_time: datetime | None,
        rate_limit: int = 0,
        labels: Mapping[str, str] | None = None,
        *,
        caller: Caller = ANONYMOUS,
    ) -> CreatedKey:
        now = self.now()
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        name = self._no_key_in("name", validation.name(name))
        granted = validation.scopes(scopes, self.catalog)
        expire_time = validation.expire_time(expire_time, now)
        rate_limit = validation.rate_limit(rate_limit)
        checked_labels = self._check_labels(labels or {})
        await self._require_org(caller, actor, "key.create", org_id)
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
                    labels=checked_labels,
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
        self._evict(issued.digest)
        log.info(
            "key created",
            extra={
                "org_id": org_id,
                "key_id": key.id,
                "key_prefix": key.prefix,
                "actor": actor.user_id,
                "caller": actor.caller,
            },
        )
        return CreatedKey(key=key, secret=issued.secret)

    async def get_key(self, org_id: str, actor: Actor, key_id: str, *, caller: Caller = ANONYMOUS) -> ApiKey:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        key_id = validation.key_id(key_id)
        await self._require_org(caller, actor, "key.get", org_id, key_id)
        await self._require_member(actor, "key.get", org_id, key_id)
        key = await self.store.get_key(org_id, key_id)
        await self.store.audit("key.get", org_id, actor, key_id, "ok" if key else "not_found", {})
        if key is None:
            raise NotFound(f"no key {key_id} in organization {org_id}")
        return key

    async def list_keys(
        self, org_id: str, actor: Actor, page: int, limit: int, state: int | None, *, caller: Caller = ANONYMOUS
    ) -> tuple[Page, int, int]:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        page, limit = validation.page_and_limit(page, limit)
        wanted = validation.state(state)
        await self._require_org(caller, actor, "key.list", org_id)
        await self._require_member(actor, "key.list", org_id)
        result = await self.store.list_keys(org_id, wanted, self.now(), (page - 1) * limit, limit)
        await self.store.audit(
            "key.list",
            org_id,
            actor,
            None,
            "ok",
            {"page": page, "limit": limit, "state": wanted.name if wanted else None},
        )
        return result, page, limit

    async def revoke_key(
        self, org_id: str, actor: Actor, key_id: str, reason: str, *, caller: Caller = ANONYMOUS
    ) -> ApiKey:
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        key_id = validation.key_id(key_id)
        reason = self._no_key_in("reason", validation.reason(reason))
        await self._require_org(caller, actor, "key.revoke", org_id, key_id)
        await self._require_manager(actor, "key.revoke", org_id, key_id)
        revoked = await self.store.revoke_key(org_id, key_id, actor, reason, self.now())
        if revoked is None:
            await self.store.audit("key.revoke", org_id, actor, key_id, "not_found", {})
            raise NotFound(f"no key {key_id} in organization {org_id}")
        key, key_digest = revoked
        # Evict here at once so the very next Authorize in this process
        # denies; other processes evict on the store's notification.
        self._evict(key_digest)
        log.info(
            "key revoked",
            extra={
                "org_id": org_id,
                "key_id": key.id,
                "key_prefix": key.prefix,
                "actor": actor.user_id,
                "caller": actor.caller,
            },
        )
        return key

    async def rotate_key(
        self,
        org_id: str,
        actor: Actor,
        key_id: str,
        grace_period: timedelta,
        reason: str,
        expire_time: datetime | None = None,
        *,
        caller: Caller = ANONYMOUS,
    ) -> RotatedKey:
        """Replace a key without downtime: a successor with its configuration, the old key ending after the grace.

        Needs no free slot: the old key stops holding one as the successor
        takes it, in one transaction (the store's), so under concurrency the
        org never has more than the limit of keys outside a grace period.
        """
        now = self.now()
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        key_id = validation.key_id(key_id)
        grace_period = validation.grace_period(grace_period, self.max_rotation_grace)
        reason = self._no_key_in("reason", validation.reason(reason))
        expire_time = validation.expire_time(expire_time, now)
        await self._require_org(caller, actor, "key.rotate", org_id, key_id)
        await self._require_manager(actor, "key.rotate", org_id, key_id)
        issued = self.key_format.generate()
        grace_until = now + grace_period

        def plan(old: ApiKey) -> Rotation:
            state = old.state(now)
            if state is KeyState.REVOKED:
                raise FailedPrecondition(f"key {old.id} is revoked and cannot be rotated; create a new key instead")
            if old.rotated_to:
                raise FailedPrecondition(
                    f"key {old.id} was already rotated to {old.rotated_to}; rotate that key instead"
                )
            if state is KeyState.EXPIRED:
                raise FailedPrecondition(f"key {old.id} has expired and cannot be rotated; create a new key instead")
            own = old.expire_time
            return Rotation(
                successor=NewKey(
                    org_id=org_id,
                    name=old.name,
                    prefix=issued.display_prefix,
                    digest=issued.digest,
                    scopes=old.scopes,
                    created_by=actor.user_id,
                    expire_time=expire_time if expire_time is not None else own,
                    rate_limit=old.rate_limit,
                    labels=old.labels,
                    rotated_from=old.id,
                ),
                old_expire_time=grace_until if own is None or grace_until < own else own,
            )

        try:
            rotated = await self.store.rotate_key(org_id, key_id, actor, now, plan, reason)
        except FailedPrecondition:
            await self.store.audit("key.rotate", org_id, actor, key_id, "failed_precondition", {"reason": reason})
            raise
        if rotated is None:
            await self.store.audit("key.rotate", org_id, actor, key_id, "not_found", {})
            raise NotFound(f"no key {key_id} in organization {org_id}")
        for digest in rotated.digests:
            self._evict(digest)
        log.info(
            "key rotated",
            extra={
                "org_id": org_id,
                "key_id": key_id,
                "key_prefix": rotated.previous.prefix,
                "rotated_to": rotated.key.id,
                "actor": actor.user_id,
            },
        )
        return RotatedKey(key=rotated.key, secret=issued.secret, previous=rotated.previous)

    async def update_key(
        self,
        org_id: str,
        actor: Actor,
        key_id: str,
        fields: Sequence[str],
        name: str = "",
        labels: Mapping[str, str] | None = None,
        *,
        caller: Caller = ANONYMOUS,
    ) -> ApiKey:
        """Rename a key or replace its labels; what a key may do (scopes, expiry, rate limit) never changes."""
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        key_id = validation.key_id(key_id)
        wanted = validation.update_mask(fields)
        new_name = self._no_key_in("name", validation.name(name)) if "name" in wanted else None
        new_labels = self._check_labels(labels or {}) if "labels" in wanted else None
        await self._require_org(caller, actor, "key.update", org_id, key_id)
        await self._require_manager(actor, "key.update", org_id, key_id)

        def change(current: ApiKey) -> KeyUpdate:
            if current.revoke_time is not None:
                raise FailedPrecondition(f"key {current.id} is revoked; a revoked key cannot be updated")
            return KeyUpdate(
                name=new_name if new_name is not None else current.name,
                labels=new_labels if new_labels is not None else current.labels,
            )

        try:
            updated = await self.store.update_key(org_id, key_id, actor, self.now(), change)
        except FailedPrecondition:
            await self.store.audit("key.update", org_id, actor, key_id, "failed_precondition", {})
            raise
        if updated is None:
            await self.store.audit("key.update", org_id, actor, key_id, "not_found", {})
            raise NotFound(f"no key {key_id} in organization {org_id}")
        key, digest = updated
        self._evict(digest)  # the Principal (name, labels) of every cached answer changed
        log.info(
            "key updated",
            extra={"org_id": org_id, "key_id": key.id, "key_prefix": key.prefix, "actor": actor.user_id},
        )
        return key

    async def revoke_keys(
        self, org_id: str, actor: Actor, created_by: str, reason: str, *, caller: Caller = ANONYMOUS
    ) -> list[ApiKey]:
        """Offboarding: every active key one user created in the org goes, in one transaction."""
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        created_by = self._no_key_in("created_by", validation.created_by(created_by))
        reason = self._no_key_in("reason", validation.reason(reason))
        await self._require_org(caller, actor, "key.revoke_created_by", org_id)
        await self._require_manager(actor, "key.revoke_created_by", org_id)
        revoked = await self.store.revoke_keys_created_by(org_id, created_by, actor, reason, self.now())
        for _, digest in revoked:
            self._evict(digest)
        log.info(
            "keys revoked",
            extra={"org_id": org_id, "created_by": created_by, "count": len(revoked), "actor": actor.user_id},
        )
        return [key for key, _ in revoked]

    async def list_audit_events(
        self,
        org_id: str,
        actor: Actor,
        *,
        key_id: str = "",
        action: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        caller: Caller = ANONYMOUS,
    ) -> tuple[list[AuditEvent], str]:
        """One page of the organization's audit trail, newest first, and the token for the next ("" at the end).

        Reading the trail is itself a management call and is audited
        (``audit.list``); the next page's position is an id, so events
        written meanwhile never shift or repeat what a later page shows.
        """
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        wanted_key = validation.key_id(key_id) if key_id else None
        if action and not _ACTION.fullmatch(action):
            raise InvalidArgument("action must be an audit action such as key.create or key.revoke, or empty")
        if start_time is not None and end_time is not None and end_time < start_time:
            raise InvalidArgument("end_time must not be before start_time")
        if not 0 <= page_size <= MAX_AUDIT_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 1 and {MAX_AUDIT_PAGE_SIZE} (0 means {DEFAULT_AUDIT_PAGE_SIZE}), "
                f"got {page_size}"
            )
        limit = page_size or DEFAULT_AUDIT_PAGE_SIZE
        filters = (wanted_key, action or None, start_time, end_time)
        before = pagetoken.read(page_token, org_id, filters) if page_token else None
        await self._require_org(caller, actor, "audit.list", org_id, wanted_key)
        if not actor.role.may_manage:
            await self.store.audit("audit.list", org_id, actor, wanted_key, "denied", {})
            raise PermissionDenied("only ROLE_ADMIN or ROLE_OWNER may read the audit trail")
        # One more than the page: whether there is a next page, without a count.
        events = await self.store.list_audit_events(
            AuditQuery(org_id, wanted_key, action or None, start_time, end_time, before, limit + 1)
        )
        await self.store.audit(
            "audit.list", org_id, actor, wanted_key, "ok", {"action": action or None, "page_size": limit}
        )
        if len(events) <= limit:
            return events, ""
        page = events[:limit]
        return page, pagetoken.issue(page[-1].id, org_id, filters)

    async def get_key_usage(
        self, org_id: str, actor: Actor, key_id: str, days: int, *, caller: Caller = ANONYMOUS
    ) -> KeyUsage:
        """A key's daily Authorize counts for the last ``days`` UTC days (today included), zeros filled in.

        Revoked and expired keys keep their history: keys are never deleted.
        """
        org_id = self._check_org(org_id)
        actor = self._check_actor(actor, caller)
        key_id = validation.key_id(key_id)
        if not 0 <= days <= MAX_USAGE_DAYS:
            raise InvalidArgument(
                f"days must be between 1 and {MAX_USAGE_DAYS} (0 means {DEFAULT_USAGE_DAYS}), got {days}"
            )
        days = days or DEFAULT_USAGE_DAYS
        await self._require_org(caller, actor, "key.usage", org_id, key_id)
        await self._require_member(actor, "key.usage", org_id, key_id)
        key = await self.store.get_key(org_id, key_id)
        await self.store.audit("key.usage", org_id, actor, key_id, "ok" if key else "not_found", {"days": days})
        if key is None:
            raise NotFound(f"no key {key_id} in organization {org_id}")
        today = self.now().astimezone(UTC).date()
        first = today - timedelta(days=days - 1)
        stored = await self.store.key_usage(key_id, first, today)
        series = [(first + timedelta(days=i), stored.get(first + timedelta(days=i), (0, 0, 0))) for i in range(days)]
        return KeyUsage(days=series, last_used_time=key.last_used_time)

    async def report_leaked_keys(self, keys: Sequence[str], source: str, url: str, *, address: str) -> LeakReport:
        """Revoke every known key in ``keys``: whoever holds a key may end it (possession is the proof).

        Malformed keys are never looked up. A key is never logged or
        returned, only counted; logs name revoked keys by their prefix.
        ``address`` is the reporter's network address, the unit of the rate
        limit that keeps this from being a faster oracle than Authorize.
        """
        if not keys:
            raise InvalidArgument("keys must list at least one leaked key")
        if len(keys) > MAX_LEAKED_KEYS:
            raise InvalidArgument(f"keys must list at most {MAX_LEAKED_KEYS} keys per call, got {len(keys)}")
        # Both go into the reason, the audit trail and the logs.
        source = self._no_key_in(
            "source", validation.free_text("source", source, MAX_LEAK_SOURCE_LENGTH, example="github")
        )
        url = self._no_key_in("url", validation.free_text("url", url, MAX_LEAK_URL_LENGTH))
        within, reset = await self._leak_limiter.hit(f"leak-report:{address}", time.time())
        if not within:
            raise ResourceExhausted(
                f"at most {LEAK_REPORTS_PER_MINUTE} leak reports a minute from one address; retry in {reset} s"
            )
        reason = f"leaked: reported via {source}" + (f" at {url}" if url else "")
        digests = {keyformat.digest(k) for k in keys if self.key_format.is_well_formed(k)}
        unknown = len(set(keys)) - len(digests)
        revoked = already = 0
        for key_digest in digests:
            found = (await self.store.find_by_digest(key_digest)).key
            if found is None:
                unknown += 1
                continue
            now = self.now()
            result = await self.store.revoke_key(found.org_id, found.id, LEAK_REPORTER, reason, now)
            if result is None:  # gone between the lookup and the revocation: keys are never deleted, but be safe
                unknown += 1
                continue
            key, _ = result
            self._evict(key_digest)
            if key.revoke_time == now and key.revoked_by == LEAK_REPORTER.user_id:
                revoked += 1
                log.warning(
                    "leaked key revoked",
                    extra={
                        "org_id": key.org_id,
                        "key_id": key.id,
                        "key_prefix": key.prefix[:DISPLAY_PREFIX_LENGTH],
                        "source": source,
                        "reporter": address,
                    },
                )
            else:
                already += 1
        return LeakReport(revoked=revoked, already_revoked=already, unknown=unknown)

    def _check_labels(self, labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        checked = validation.labels(labels)
        for key, value in checked:
            self._no_key_in("labels", key)
            self._no_key_in(f"labels[{key}]", value)
        return checked

    def _check_org(self, org_id: str) -> str:
        return self._no_key_in("org_id", validation.org_id(org_id))

    def _check_actor(self, actor: Actor, caller: Caller) -> Actor:
        user_id = self._no_key_in("actor.user_id", validation.actor_user_id(actor.user_id))
        return Actor(user_id=user_id, role=validation.role(actor.role), caller=caller.name)

    def _no_key_in(self, field: str, value: str) -> str:
        """Free-form fields are stored, audited and logged: a key pasted into one would leak."""
        if self.key_format.appears_in(value):
            raise InvalidArgument(
                f"{field} holds an API key; pass the intended value (and revoke that key if it was shared)"
            )
        return value

    async def _require_org(
        self, caller: Caller, actor: Actor, action: str, org_id: str, key_id: str | None = None
    ) -> None:
        """An org-bound admin token (or client certificate) manages its organizations only.

        Checked before roles, and audited in the organization that was
        attempted, so its admins see the attempt.
        """
        if not caller.may_act_for(org_id):
            await self.store.audit(action, org_id, actor, key_id, "denied", {"why": "caller not bound to org"})
            raise PermissionDenied(f"caller {caller.name} may not manage organization {org_id}")

    async def _require_member(self, actor: Actor, action: str, org_id: str, key_id: str | None = None) -> None:
        if actor.role == 0:
            await self.store.audit(action, org_id, actor, key_id, "denied", {})
            raise PermissionDenied("actor.role must be set (ROLE_MEMBER, ROLE_ADMIN or ROLE_OWNER)")

    async def _require_manager(self, actor: Actor, action: str, org_id: str, key_id: str | None = None) -> None:
        if not actor.role.may_manage:
            await self.store.audit(action, org_id, actor, key_id, "denied", {})
            raise PermissionDenied("only ROLE_ADMIN or ROLE_OWNER may create, rotate, update or revoke keys")
