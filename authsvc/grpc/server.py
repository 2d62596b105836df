"""Server assembly: every service on one port, behind one handler wrapper.

The wrapper is the only place that turns exceptions into gRPC statuses
(through ``authsvc.grpc.status``), checks admin tokens, and answers requests
that do not even decode (invalid UTF-8 in a string field) with
INVALID_ARGUMENT instead of grpcio's generic INTERNAL.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from authsvc.errors import Unauthenticated
from authsvc.grpc.status import to_status
from authsvc.metrics import Recorder

KEY_SERVICE = authsvc_pb2.DESCRIPTOR.services_by_name["KeyService"]
MANAGEMENT_METHODS = frozenset({"CreateKey", "GetKey", "ListKeys", "RevokeKey"})
_UNDECODABLE = object()

Behavior = Callable[[Any], Awaitable[Any]]


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


class AdminTokens:
    """Constant-time check of ``authorization: Bearer <token>`` against the configured tokens."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        for name, value in metadata or ():
            if name == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                offered = hashlib.sha256(value[7:].strip().encode()).digest()
                # Compare against every token so timing does not tell which matched.
                matched = False
                for digest in self._digests:
                    matched |= hmac.compare_digest(offered, digest)
                if matched:
                    return
        raise Unauthenticated("management calls need metadata 'authorization: Bearer <admin token>'")


def _wrap(
    behavior: Behavior, method: str, admin: AdminTokens | None, metrics: Recorder | None = None
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    name = method.rpartition("/")[2]

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            if metrics is not None:
                metrics.managed(name, grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request could not be decoded: string fields must be valid UTF-8",
            )
        try:
            if admin:
                admin.check(context.invocation_metadata())
            response = await behavior(request)
        except Exception as exc:  # mapped in one place; a traceback never reaches the caller
            code, message = to_status(exc, method)
        else:
            if metrics is not None:
                metrics.managed(name, "OK")
            return response
        if metrics is not None:
            metrics.managed(name, code.name)
        await context.abort(code, message)

    return handler


def service_handler(
    descriptor: ServiceDescriptor,
    servicer: object,
    *,
    admin: AdminTokens | None = None,
    protected: frozenset[str] = frozenset(),
    metrics: Recorder | None = None,
) -> grpc.GenericRpcHandler:
    """Handlers for every method of ``descriptor``, implemented by ``servicer.<Method>(request)``.

    ``metrics`` counts the ``protected`` (management) methods' calls by status code.
    """
    handlers = {}
    for method in descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _wrap(
                getattr(servicer, method.name),
                f"/{descriptor.full_name}/{method.name}",
                admin if method.name in protected else None,
                metrics if method.name in protected else None,
            ),
            request_deserializer=_lenient(request_class.FromString),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def build_server(
    services: list[tuple[ServiceDescriptor, grpc.GenericRpcHandler]], health: HealthServicer, *, reuse_port: bool
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            # Without SO_REUSEPORT a second server on the same port fails to
            # bind (a clear start-up error) instead of silently sharing it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", 1024 * 1024),
            # Envoy and service clients keep connections for long; keep them healthy.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    server.add_generic_rpc_handlers([handler for _, handler in services])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [d.full_name for d, _ in services]
        + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return server
