"""The domain: keys, scopes, actors, grants and the authorization rules.

Frozen dataclasses and pure functions, no I/O: the gRPC and Envoy adapters
translate to and from these types, and the store persists them. Reading the
scope catalog's file is the configuration's job (``authsvc.config``).
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

# Decision, Reason, Principal, RateLimit, Grant and decide are the client package's value
# types: the same values on both sides of the wire, defined once (the server
# depends on the client package for the generated code anyway). Re-exported
# from here for the rest of the server.
from authsvc_client._decision import Decision as Decision
from authsvc_client._decision import Grant as Grant
from authsvc_client._decision import Principal as Principal
from authsvc_client._decision import RateLimit as RateLimit
from authsvc_client._decision import Reason as Reason
from authsvc_client._decision import decide as decide

from authsvc.core.errors import ConfigError, InvalidArgument

_OK = Reason.OK
_OK_STATUS, _OK_MESSAGE = _OK.http_status, _OK.message


class Role(enum.IntEnum):
    """The acting user's role in the organization (values match the proto)."""

    UNSPECIFIED = 0
    MEMBER = 1
    ADMIN = 2
    OWNER = 3

    @property
    def may_manage(self) -> bool:
        """Only admins and owners may create or revoke keys."""
        return self in (Role.ADMIN, Role.OWNER)


class KeyState(enum.IntEnum):
    """Derived from revoke and expire times; revocation wins over expiry."""

    UNSPECIFIED = 0
    ACTIVE = 1
    EXPIRED = 2
    REVOKED = 3


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the other end of a management call, as authsvc itself authenticated it.

    The transport (the gRPC adapter) works this out from an admin token or a
    client certificate and hands it to the core; the core never sees how.
    Unlike ``Actor``, which the calling service merely asserts, a caller is
    proven, so it is what the audit trail can rely on and what an
    organization binding is checked against.
    """

    name: str | None = None
    """The admin token's or client certificate's configured name; ``None`` when management is unprotected."""
    orgs: frozenset[str] | None = None
    """The organizations this caller may manage; ``None``: any."""

    def may_act_for(self, org_id: str) -> bool:
        return self.orgs is None or org_id in self.orgs


#: A management call nobody authenticated (no admin tokens or client names configured).
ANONYMOUS = Caller()


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, as asserted by the calling service, and the authenticated caller that asserted it."""

    user_id: str
    role: Role
    caller: str | None = None
    """``Caller.name`` of the call, recorded with every audit row; ``None``: unauthenticated."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's stored metadata; never the secret. ``digest`` stays inside authsvc."""

    id: str
    org_id: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_by: str
    create_time: datetime
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    revoked_by: str = ""
    revoke_reason: str = ""
    last_used_time: datetime | None = None
    rate_limit: int = 0
    #: ``(name, value)`` pairs sorted by name (see ``Principal.labels``).
    labels: tuple[tuple[str, str], ...] = ()
    #: The key that replaced this one (``RotateKey``); "" if none. A rotated
    #: key's ``expire_time`` is the end of its grace period.
    rotated_to: str = ""
    #: The key this one replaced; "" if none.
    rotated_from: str = ""

    def state(self, now: datetime) -> KeyState:
        if self.revoke_time is not None:
            return KeyState.REVOKED
        if self.expire_time is not None and self.expire_time <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    description: str = ""
    implies: tuple[str, ...] = ()
    reserved: bool = False


@dataclass(frozen=True)
class ScopeCatalog:
    """The scopes a deployment grants, with their implications expanded once at load."""

    scopes: Mapping[str, Scope]
    _closure: Mapping[str, frozenset[str]] = field(init=False, repr=False)
    _shared: dict[tuple[str, ...], tuple[frozenset[str], tuple[str, ...]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        closure: dict[str, frozenset[str]] = {}
        for name in self.scopes:
            seen: set[str] = set()
            stack = [name]
            while stack:
                current = stack.pop()
                if current in seen:
                    continue
                seen.add(current)
                stack.extend(self.scopes[current].implies)
            closure[name] = frozenset(seen)
        object.__setattr__(self, "_closure", closure)
        object.__setattr__(self, "_shared", {})

    def __contains__(self, name: object) -> bool:
        return name in self.scopes

    def effective(self, granted: Iterable[str]) -> frozenset[str]:
        """Granted scopes plus everything they imply (``write`` brings ``read``)."""
        result: set[str] = set()
        for name in granted:
            result |= self._closure.get(name, frozenset((name,)))
        return frozenset(result)

    def shared_effective(self, granted: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
        """``effective(granted)`` as a set and a sorted tuple, one shared copy per distinct grant.

        Cached keys mostly share a few scope combinations (at most 2**len(catalog));
        sharing them keeps a cached key well under 1 KiB.
        """
        shared = self._shared.get(granted)
        if shared is None:
            effective = self.effective(granted)
            shared = self._shared[granted] = (effective, tuple(sorted(effective)))
        return shared

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], source: str) -> ScopeCatalog:
        raw = data.get("scopes")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{source}: needs a [scopes.<name>] table for each scope")
        scopes: dict[str, Scope] = {}
        for name, spec in raw.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{source}: scopes.{name} must be a table")
            implies = spec.get("implies", [])
            if not isinstance(implies, list) or not all(isinstance(i, str) for i in implies):
                raise ConfigError(f"{source}: scopes.{name}.implies must be a list of scope names")
            scopes[name] = Scope(
                name=name,
                description=str(spec.get("description", "")),
                implies=tuple(implies),
                reserved=bool(spec.get("reserved", False)),
            )
        for scope in scopes.values():
            for implied in scope.implies:
                if implied not in scopes:
                    raise ConfigError(f"{source}: scopes.{scope.name} implies unknown scope {implied!r}")
        return cls(scopes)

    def check_required(self, scope: str) -> None:
        """An unknown required scope is a bug in the calling service, not a denial."""
        if scope and scope not in self.scopes:
            raise InvalidArgument(f"required_scope {self.unknown(scope)}")

    def unknown(self, scope: str) -> str:
        """Why ``scope`` is refused, safe to send back: see ``describe_scope``."""
        return f"{describe_scope(scope)} is not in the scope catalog; known scopes: {', '.join(sorted(self.scopes))}"


# What a scope name can look like; a key never does (keys are longer and mixed-case).
_SCOPE_SHAPE = re.compile(r"[a-z][a-z0-9_:.\-]{0,39}")


def describe_scope(value: str) -> str:
    """An unknown scope for an error message: quoted when it looks like a scope name, else only its length.

    A caller that swaps ``key`` and ``required_scope`` must not get its key
    echoed back (and logged by whoever logs errors), nor may a 100 kB value
    come back in a status message.
    """
    return repr(value) if _SCOPE_SHAPE.fullmatch(value) else f"(a value of {len(value)} characters)"


# Distinct label sets shared by cached keys; bounded so that keys with unique
# labels cannot grow it without limit (past it, each key keeps its own copy).
_SHARED_LABELS: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
_MAX_SHARED_LABEL_SETS = 10_000


def shared_labels(labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """One shared copy of a label set, with interned strings.

    Most keys of a deployment carry one of a few label sets (``tier=gold``,
    ``env=prod``): sharing them keeps a cached key small, like
    ``ScopeCatalog.shared_effective`` does for scopes.
    """
    if not labels:
        return ()
    shared = _SHARED_LABELS.get(labels)
    if shared is None:
        shared = tuple((sys.intern(k), sys.intern(v)) for k, v in labels)
        if len(_SHARED_LABELS) < _MAX_SHARED_LABEL_SETS:
            _SHARED_LABELS[shared] = shared
    return shared


class KeyGrant(Grant):
    """The server's builder of a ``Grant`` from a stored key (``Grant`` and ``decide`` live in the client package)."""

    __slots__ = ()

    @classmethod
    def of(cls, key: ApiKey, catalog: ScopeCatalog) -> KeyGrant:
        effective, sorted_scopes = catalog.shared_effective(key.scopes)
        principal = Principal(
            key_id=key.id,
            # Many keys share an org and a creator: keep one copy of each.
            org_id=sys.intern(key.org_id),
            user_id=sys.intern(key.created_by),
            scopes=sorted_scopes,
            key_prefix=key.prefix,
            key_name=key.name,
            labels=shared_labels(key.labels),
        )
        return cls(
            principal=principal,
            effective_scopes=effective,
            expire_at=key.expire_time.timestamp() if key.expire_time is not None else None,
            revoked=key.revoke_time is not None,
            rate_limit=key.rate_limit,
            # Status and message spelled out: the derived defaults cost two more frozen-field writes (every miss).
            allow=Decision(_OK, principal, http_status=_OK_STATUS, message=_OK_MESSAGE),
        )
