"""The key lifecycle: create, get, list and revoke, with validation, roles, the key limit and audit.

The gRPC KeyService adapter translates its messages into calls here and
back, and does nothing else. Every input is checked before anything is
written, so a refused call leaves nothing behind; every refused or
permitted call is audited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from authsvc.core import validation
from authsvc.core.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import ANONYMOUS, Actor, ApiKey, Caller, ScopeCatalog
from authsvc.core.ports import DateClock, KeyStore, NewKey, Page, TooManyActiveKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"CreatedKey(key={self.key!r}, secret=<redacted>)"


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
        evict: Callable[[bytes], None] = lambda digest: None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.key_format = key_format
        self.max_active_keys = max_active_keys
        self.now = clock
        self._evict = evict

    async def create_key(
        self,
        org_id: str,
        actor: Actor,
        name: str,
        scopes: Sequence[str],
        expire_time: datetime | None,
        rate_limit: int = 0,
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
            raise PermissionDenied("only ROLE_ADMIN or ROLE_OWNER may create or revoke keys")
