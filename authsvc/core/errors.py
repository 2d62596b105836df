"""The errors authsvc raises, typed where they arise.

Each transport maps them to its own status codes in exactly one place
(``authsvc.grpc.status``); nothing else in the package knows about codes.
A denied Authorize is *not* an error: it is a ``Decision``.

::

    AuthsvcError
     ├── InvalidArgument      the caller sent something to fix (message says what)
     ├── NotFound             no such key in this organization
     ├── PermissionDenied     the actor's role may not do this
     ├── Unauthenticated      missing or wrong admin token
     ├── ResourceExhausted    e.g. the organization's active-key limit
 ├── FailedPrecondition   the key's state forbids it (rotating a revoked key); message says why
     ├── Unavailable          the store cannot be reached: fail closed, retry later
     │    └── AtCapacity      no room for a call that would wait (admission, lookup queue): retry shortly
     │         └── OverUnknownKeyBudget  a key the store does not hold, past the budget of such lookups
     ├── Aborted              the store gave up on a conflict (serialization, deadlock): retry now
     └── ConfigError          a start-up setting is wrong (names the variable)
"""

from __future__ import annotations


class AuthsvcError(Exception):
    """Base of every error authsvc raises on purpose.

    ``str(error)`` is safe to show to the caller: it never contains a secret.
    """


class InvalidArgument(AuthsvcError):
    """The request is malformed; the message says which field and how to fix it."""


class NotFound(AuthsvcError):
    """The key does not exist in the caller's organization.

    Another organization's key is reported exactly like a missing one, so ids
    cannot be probed across organizations.
    """


class PermissionDenied(AuthsvcError):
    """The actor's role does not allow the operation."""


class Unauthenticated(AuthsvcError):
    """The management call lacks a valid admin token."""


class ResourceExhausted(AuthsvcError):
    """A quota is used up, e.g. the organization already has its maximum of active keys."""


class FailedPrecondition(AuthsvcError):
    """The request is well formed but the key's state forbids it (a revoked, expired or rotated key)."""


class Unavailable(AuthsvcError):
    """The store could not be reached in time; nothing was decided or written."""

    #: How an Authorize that raised it is counted (``authsvc_authorize_total{reason=...}``).
    reason = "unavailable"


class AtCapacity(Unavailable):
    """The process has no room for a call that would wait (no admission slot, the lookup queue full):
    UNAVAILABLE to the caller, like an outage, but counted apart (``reason="at_capacity"``) so overload
    does not read as a store down."""

    reason = "at_capacity"


class OverUnknownKeyBudget(AtCapacity):
    """A key the store does not hold (``authsvc.core.known``), past this process's budget of such lookups:
    refused like any call at capacity, but counted apart (``reason="unknown_key_budget"``), since many
    of them mean someone is trying forged keys, not that the process is short of room."""

    reason = "unknown_key_budget"


class Aborted(AuthsvcError):
    """The store rolled the call back to resolve a conflict with another; nothing was written, a retry may succeed."""


class ConfigError(AuthsvcError):
    """A setting is invalid; the message names the variable to change."""
