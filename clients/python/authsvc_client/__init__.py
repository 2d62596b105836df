"""authsvc client: ask authsvc whether an API key may do what a request needs.

- ``Client`` / ``AsyncClient``: ``authorize(key, scope) -> Decision`` (the scope is required);
  ``authenticate(key) -> Decision`` only checks that the key is valid.
  ``TlsConfig`` for TLS and mTLS.
- ``AuthzServerInterceptor`` / ``AsyncAuthzServerInterceptor``: protect a gRPC server.
- ``AuthsvcMiddleware``: protect an ASGI application.
- ``current_principal()``: the principal of the request being handled.

Only grpcio and protobuf are needed; the generated stubs are in ``authsvc_client.v1``.
Failures are this package's exceptions (``AuthsvcError`` and subclasses), never ``grpc`` ones.

The value types (``Decision``, ``Reason``, ...), the decision cache and the
HTTP policy import neither grpc nor protobuf: authsvc's I/O-free core shares
them. So the names that need grpc are imported on first use (PEP 562), and
``import authsvc_client._decision`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from authsvc_client._credentials import current_principal
from authsvc_client._decision import Decision, Principal, RateLimit, Reason

if TYPE_CHECKING:
    from authsvc_client._asgi import AuthsvcMiddleware
    from authsvc_client._client import DEFAULT_TIMEOUT, AsyncClient, Client
    from authsvc_client._exceptions import (
        AuthsvcError,
        InternalError,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )
    from authsvc_client._interceptor import AsyncAuthzServerInterceptor, AuthzServerInterceptor, MethodPolicy
    from authsvc_client._tls import TlsConfig

_LAZY = {
    "AuthsvcMiddleware": "_asgi",
    "DEFAULT_TIMEOUT": "_client",
    "AsyncClient": "_client",
    "Client": "_client",
    "AuthsvcError": "_exceptions",
    "InternalError": "_exceptions",
    "InvalidArgument": "_exceptions",
    "NotFound": "_exceptions",
    "PermissionDenied": "_exceptions",
    "ResourceExhausted": "_exceptions",
    "Unauthenticated": "_exceptions",
    "Unavailable": "_exceptions",
    "AsyncAuthzServerInterceptor": "_interceptor",
    "AuthzServerInterceptor": "_interceptor",
    "MethodPolicy": "_interceptor",
    "TlsConfig": "_tls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'authsvc_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"authsvc_client.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncAuthzServerInterceptor",
    "AsyncClient",
    "AuthsvcError",
    "AuthsvcMiddleware",
    "AuthzServerInterceptor",
    "Client",
    "Decision",
    "InternalError",
    "InvalidArgument",
    "MethodPolicy",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "RateLimit",
    "Reason",
    "ResourceExhausted",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "current_principal",
]
