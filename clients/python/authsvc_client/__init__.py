"""authsvc client: ask authsvc whether an API key may do what a request needs.

- ``Client`` / ``AsyncClient``: ``authorize(key, scope) -> Decision`` (the scope is required);
  ``authenticate(key) -> Decision`` only checks that the key is valid.
- ``AuthzServerInterceptor`` / ``AsyncAuthzServerInterceptor``: protect a gRPC server.
- ``AuthsvcMiddleware``: protect an ASGI application.
- ``current_principal()``: the principal of the request being handled.

Only grpcio and protobuf are needed; the generated stubs are in ``authsvc_client.v1``.
Failures are this package's exceptions (``AuthsvcError`` and subclasses), never ``grpc`` ones.
"""

from authsvc_client._asgi import AuthsvcMiddleware
from authsvc_client._client import DEFAULT_TIMEOUT, AsyncClient, Client
from authsvc_client._credentials import current_principal
from authsvc_client._decision import Decision, Principal, RateLimit, Reason
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
    "Unauthenticated",
    "Unavailable",
    "current_principal",
]
