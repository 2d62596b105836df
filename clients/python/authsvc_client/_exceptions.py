"""The errors the authsvc client raises; callers never import ``grpc`` to handle them.

A *denied* key is not an error: ``authorize()`` returns a ``Decision`` with
``allowed=False``. An exception means authsvc gave no answer, and a caller
protecting something must then fail closed (deny), whatever the subclass::

    AuthsvcError                  base: catch this to fail closed on anything
     ├── Unavailable              authsvc could not answer: unreachable, its store is down,
     │                            or the deadline passed. Deny (503) and retry later.
     ├── InvalidArgument          the caller sent something to fix, e.g. a required scope
     │                            that is not in authsvc's catalog (a configuration bug)
     ├── Unauthenticated          a management call without a valid admin token
     ├── PermissionDenied         the actor's role may not do this
     ├── NotFound                 no such key in this organization
     ├── ResourceExhausted        a quota is used up (e.g. active keys per organization)
     └── InternalError            anything else authsvc or the transport reported

``str(error)`` is the server's message, which never contains a key; the
original ``grpc.RpcError`` is kept as ``__cause__`` for logs.
"""

from __future__ import annotations

import grpc


class AuthsvcError(Exception):
    """Base of every error this client raises; ``status`` is the gRPC status name (e.g. ``"UNAVAILABLE"``)."""

    def __init__(self, message: str, *, status: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Unavailable(AuthsvcError):
    """authsvc gave no answer in time (unreachable, store down, deadline passed): fail closed."""


class InvalidArgument(AuthsvcError):
    """The request is wrong; the message says what to fix (e.g. an unknown required scope)."""


class Unauthenticated(AuthsvcError):
    """A management call lacked a valid ``authorization: Bearer <admin token>``."""


class PermissionDenied(AuthsvcError):
    """The actor's role does not allow the management call."""


class NotFound(AuthsvcError):
    """The key does not exist in the caller's organization."""


class ResourceExhausted(AuthsvcError):
    """A quota is used up."""


class InternalError(AuthsvcError):
    """authsvc or the transport failed in a way the caller cannot fix; treat as a denial."""


# A deadline or a dropped call means "no answer", exactly like an unreachable
# server: callers must handle both the same way, so both are Unavailable.
_BY_STATUS: dict[grpc.StatusCode, type[AuthsvcError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.ABORTED: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def from_rpc_error(error: grpc.RpcError) -> AuthsvcError:
    """The one mapping from a gRPC failure to this library's exception.

    Raise the result ``from error`` so the transport detail stays in the chain.
    """
    # Sync errors are grpc.Call objects, asyncio ones AioRpcError: both have code()/details().
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else None
    details = str((details_of() if callable(details_of) else None) or "")
    if not isinstance(code, grpc.StatusCode):
        return InternalError(details or "authsvc call failed", status="UNKNOWN")
    kind = _BY_STATUS.get(code, InternalError)
    return kind(details or f"authsvc answered {code.name}", status=code.name)
