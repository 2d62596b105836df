"""What Authorize answers, as plain frozen values: ``Decision``, ``Principal``, ``RateLimit``.

A denial is an answer, not an error: ``authorize()`` returns a ``Decision``
with ``allowed=False`` and a ``Reason``; only "authsvc could not answer" and
caller bugs raise (see ``_exceptions``). The values hold no key: the secret
the caller passed in is never stored on anything this module builds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from authsvc_client.v1 import authsvc_pb2 as pb


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
        """The short code used in JSON error bodies, e.g. ``"insufficient_scope"`` (same as the Envoy adapter)."""
        return self.name.lower()


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


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Where the key stands in its current rate-limit window."""

    #: Requests allowed per window.
    limit: int
    #: Requests left in the current window.
    remaining: int
    #: Seconds until the window resets: the ``Retry-After`` of a 429.
    reset_seconds: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one Authorize call."""

    allowed: bool
    reason: Reason
    #: What an HTTP gateway should answer: 200, 401, 403 or 429.
    http_status: int
    #: Short and human readable; never contains the key.
    message: str
    #: Set whenever the key was identified, also on denials for scope, expiry or revocation.
    principal: Principal | None = None
    #: Set when a rate limit applies to the key.
    rate_limit: RateLimit | None = None

    @property
    def retry_after(self) -> int:
        """Seconds a rate-limited caller should wait (``Retry-After``): the window's reset, at least 1."""
        return max(self.rate_limit.reset_seconds if self.rate_limit else 1, 1)


def _reason(value: int) -> Reason:
    try:
        return Reason(value)
    except ValueError:
        return Reason.UNSPECIFIED


def decision_from_proto(reply: pb.AuthorizeResponse) -> Decision:
    """Translate the wire answer; fields are read with ``HasField`` so older servers still decode."""
    principal = None
    if reply.HasField("principal"):
        p = reply.principal
        principal = Principal(
            key_id=p.key_id,
            org_id=p.org_id,
            user_id=p.user_id,
            scopes=tuple(p.scopes),
            key_prefix=p.key_prefix,
            key_name=p.key_name,
        )
    rate_limit = None
    if reply.HasField("rate_limit"):
        r = reply.rate_limit
        rate_limit = RateLimit(limit=r.limit, remaining=r.remaining, reset_seconds=r.reset_seconds)
    reason = _reason(reply.reason)
    # Fail closed on an inconsistent answer: "allowed" needs both the flag and REASON_OK.
    allowed = reply.allowed and reason is Reason.OK
    return Decision(
        allowed=allowed,
        reason=reason,
        http_status=reply.http_status if allowed or reply.http_status >= 400 else 403,
        message=reply.message,
        principal=principal,
        rate_limit=rate_limit,
    )
