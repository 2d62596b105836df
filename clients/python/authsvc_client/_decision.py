"""What Authorize answers, as plain frozen values (``Decision``, ``Principal``, ``RateLimit``), and its rules.

One set of types for both sides of the wire: authsvc's core builds these
``Decision`` objects and this client decodes the same ones, so a reason, its
HTTP status and its message are defined once, here (``Reason.http_status``,
``Reason.message``). How an HTTP or gRPC front end renders a decision lives
in ``_http``.

A denial is an answer, not an error: ``authorize()`` returns a ``Decision``
with ``allowed=False`` and a ``Reason``; only "authsvc could not answer" and
caller bugs raise (see ``_exceptions``). The values hold no key: the secret
the caller passed in is never stored on anything this module builds.

No I/O and no grpc here: authsvc's core imports this module.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Reason(enum.IntEnum):
    """Why Authorize allowed or denied; the values are the proto's ``authsvc.v1.Reason``.

    A reason this client does not know yet (a newer server) reads as
    ``UNSPECIFIED``; ``Decision.allowed`` and ``http_status`` still carry the answer.
    """

    UNSPECIFIED = 0
    OK = 1
    MISSING_KEY = 2
    MALFORMED_KEY = 3
    UNKNOWN_KEY = 4
    REVOKED = 5
    EXPIRED = 6
    INSUFFICIENT_SCOPE = 7
    RATE_LIMITED = 8

    @property
    def code(self) -> str:
        """The short code used in JSON error bodies, e.g. ``"insufficient_scope"``."""
        return self.name.lower()

    @property
    def http_status(self) -> int:
        """What an HTTP gateway answers for this reason: 200, 401, 403 or 429."""
        return HTTP_STATUS.get(self, 403)

    @property
    def message(self) -> str:
        """Short and human readable; never contains the key."""
        return MESSAGES.get(self, "denied")


# Module-level aliases for the hot paths: an enum member read through its class
# (``Reason.OK``) costs some 0.2 us on Python 3.11, a global read a tenth of that.
_OK, _REVOKED, _EXPIRED, _INSUFFICIENT_SCOPE = Reason.OK, Reason.REVOKED, Reason.EXPIRED, Reason.INSUFFICIENT_SCOPE

#: The one table from a reason to its HTTP status. 401: the key itself is no
#: good (send another); 403: a good key without the scope; 429: slow down.
#: ``UNSPECIFIED`` (an answer this client cannot read) is none of these: a denial, 403.
HTTP_STATUS: Mapping[Reason, int] = {
    Reason.OK: 200,
    Reason.MISSING_KEY: 401,
    Reason.MALFORMED_KEY: 401,
    Reason.UNKNOWN_KEY: 401,
    Reason.REVOKED: 401,
    Reason.EXPIRED: 401,
    Reason.INSUFFICIENT_SCOPE: 403,
    Reason.RATE_LIMITED: 429,
}

MESSAGES: Mapping[Reason, str] = {
    Reason.OK: "allowed",
    Reason.MISSING_KEY: "no API key was sent",
    Reason.MALFORMED_KEY: "the API key is malformed",
    Reason.UNKNOWN_KEY: "the API key is not valid",
    Reason.REVOKED: "the API key has been revoked",
    Reason.EXPIRED: "the API key has expired",
    Reason.INSUFFICIENT_SCOPE: "the API key lacks the required scope",
    Reason.RATE_LIMITED: "the API key is over its rate limit",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The key Authorize resolved: who acts, for which organization, with which scopes."""

    key_id: str
    org_id: str
    #: The key's creator, so a service can apply that user's own permissions on top.
    user_id: str
    #: Effective scopes: granted scopes with their implications expanded.
    scopes: tuple[str, ...]
    #: The first 12 characters of the key: safe to log, useless to authenticate.
    key_prefix: str
    key_name: str
    #: The key's labels (a customer tier, a deployment stage) as ``(name, value)``
    #: pairs sorted by name: a tuple keeps the principal frozen and hashable,
    #: and lets cached keys share one copy of a common label set.
    #: ``dict(principal.labels)`` or ``principal.label("tier")`` to read them.
    labels: tuple[tuple[str, str], ...] = ()

    def label(self, name: str, default: str | None = None) -> str | None:
        """The value of label ``name``, or ``default`` when the key has no such label."""
        for key, value in self.labels:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Where the key stands in its current rate-limit window."""

    #: Requests allowed per window.
    limit: int
    #: Requests left in the current window.
    remaining: int
    #: Seconds until the window resets: the ``Retry-After`` of a 429.
    reset_seconds: int


_DERIVED = -1


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one Authorize call.

    ``Decision(Reason.REVOKED, principal)`` takes its HTTP status and message
    from the reason. A decoded answer may carry the server's own (for a
    reason this client does not know yet), passed as keywords.
    """

    reason: Reason
    #: Set whenever the key was identified, also on denials for scope, expiry or revocation.
    principal: Principal | None = None
    #: Set when a rate limit applies to the key.
    rate_limit: RateLimit | None = None
    #: What an HTTP gateway should answer: 200, 401, 403 or 429.
    http_status: int = field(default=_DERIVED, kw_only=True)
    #: Short and human readable; never contains the key.
    message: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if self.http_status == _DERIVED:
            object.__setattr__(self, "http_status", self.reason.http_status)
        if not self.message:
            object.__setattr__(self, "message", self.reason.message)

    @property
    def allowed(self) -> bool:
        """Only ``REASON_OK`` allows; every other reason, known or not, denies."""
        return self.reason is _OK

    @property
    def retry_after(self) -> int:
        """Seconds a rate-limited caller should wait (``Retry-After``): the window's reset, at least 1."""
        return max(self.rate_limit.reset_seconds if self.rate_limit else 1, 1)


@dataclass(frozen=True, slots=True)
class Grant:
    """What deciding needs of a key: the server caches one per key, and so does a client's cache.

    One type and one ``decide`` on both sides of the wire, so a client that
    decides a cached key locally applies exactly the server's rules.
    ``expire_at`` is a POSIX timestamp so the hot path compares floats;
    ``allow`` is the (immutable) allowed decision, built once rather than on
    every hit.
    """

    principal: Principal
    effective_scopes: frozenset[str]
    expire_at: float | None
    revoked: bool
    rate_limit: int
    allow: Decision


def decide(grant: Grant | None, required_scope: str, now: float) -> Decision:
    """The authorization rules, in the order a user expects them.

    Revocation is checked before expiry (a revoked key says so even after it
    would have expired); scope is checked last, so a 403 always means the key
    itself is good. Rate limits are not decided here: a key under one is
    never decided from a client's cache, and the server counts it.
    """
    if grant is None:
        return UNKNOWN
    if grant.revoked:
        return Decision(_REVOKED, grant.principal)
    if grant.expire_at is not None and grant.expire_at <= now:
        return Decision(_EXPIRED, grant.principal)
    if required_scope and required_scope not in grant.effective_scopes:
        return Decision(_INSUFFICIENT_SCOPE, grant.principal)
    return grant.allow


#: The answer for every unknown key: decisions are immutable, so one serves all (building one costs ~2 us).
UNKNOWN = Decision(Reason.UNKNOWN_KEY)

#: A request that carried two different keys: no component may pick one.
TWO_KEYS = Decision(Reason.MALFORMED_KEY, message="the request carries two different API keys; send exactly one")
