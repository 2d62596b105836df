"""Server assembly: every service on one port, behind one handler wrapper.

The wrapper is the only place that turns exceptions into gRPC statuses
(through ``authsvc.grpc.status``), authenticates management callers (admin
tokens, admin client certificates) and hands them to the behaviour, and answers requests
that do not even decode (invalid UTF-8 in a string field) with
INVALID_ARGUMENT instead of grpcio's generic INTERNAL.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from authsvc.access import AdminClient, AdminToken
from authsvc.core.admission import AT_CAPACITY, Admission
from authsvc.core.errors import Unauthenticated
from authsvc.core.keys import ANONYMOUS, Caller
from authsvc.core.ports import Recorder
from authsvc.grpc.status import to_status

KEY_SERVICE = authsvc_pb2.DESCRIPTOR.services_by_name["KeyService"]
# Methods where possession of a key is the proof, open to anyone who reaches the port.
OPEN_METHODS = frozenset({"Authorize", "WatchDecisions", "ReportLeakedKeys"})
# Every other KeyService method is a management call behind the admin
# tokens: derived from the contract, so a method added later is guarded by default.
# WatchDecisions is the client cache's stream (digests and heartbeats, no secret,
# no principal), as open as Authorize.
MANAGEMENT_METHODS = frozenset(m.name for m in KEY_SERVICE.methods if m.name not in OPEN_METHODS)
# Called as ``behavior(request, address)`` with the caller's network address (rate limits per address).
PEER_METHODS = frozenset({"ReportLeakedKeys"})
_UNDECODABLE = object()

Behavior = Callable[..., Awaitable[Any]]


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _passthrough(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A behaviour may answer with bytes it serialized (and memoised) itself: Authorize does."""

    def serializer(response: Any) -> bytes:
        return response if response.__class__ is bytes else serialize(response)

    return serializer


class AdminTokens:
    """Who a management call comes from: a named admin token, or an admin client certificate.

    Tokens are compared in constant time: the offered token's SHA-256
    against every configured digest, all of them every time, so timing tells
    neither whether nor which one matched. A token that is offered is
    decisive: a wrong one is refused even over an admin certificate.
    Certificate identities are the verified client certificate's SAN DNS
    names and URIs, else its CN (gRPC's ``peer_dns``, ``peer_uri``,
    ``x509_common_name``); the server only sees them when mTLS is on.
    With nothing configured, management is open and the caller anonymous.
    """

    def __init__(self, tokens: Iterable[AdminToken], clients: Iterable[AdminClient] = ()) -> None:
        self._tokens = [(hashlib.sha256(t.token.encode()).digest(), Caller(t.name, t.orgs)) for t in tokens]
        self._clients = {c.name: Caller(c.name, c.orgs) for c in clients}

    def __bool__(self) -> bool:
        return bool(self._tokens or self._clients)

    def check(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        if not self:
            return ANONYMOUS
        offered = self._offered(context.invocation_metadata())
        if offered is not None:
            digest = hashlib.sha256(offered.encode()).digest()
            found: Caller | None = None
            for candidate, caller in self._tokens:
                if hmac.compare_digest(digest, candidate) and found is None:
                    found = caller
            if found is None:
                raise Unauthenticated("the admin token is not valid")
            return found
        if self._clients:
            for name in _certificate_names(context.auth_context()):
                if name in self._clients:
                    return self._clients[name]
        raise Unauthenticated(
            "management calls need metadata 'authorization: Bearer <admin token>' or an admin client certificate"
        )

    @staticmethod
    def _offered(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        for name, value in metadata or ():
            if name == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                return value[7:].strip()
        return None


def _certificate_names(auth: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified client certificate's identities: SAN DNS names and URIs, else its CN."""
    names = [*auth.get("peer_dns", ()), *auth.get("peer_uri", ())] or list(auth.get("x509_common_name", ()))
    return [n.decode("utf-8", "replace") for n in names]


def peer_address(peer: str) -> str:
    """The address part of gRPC's ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` peer: one per host, not per port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def _wrap(
    behavior: Behavior,
    method: str,
    admin: AdminTokens | None,
    metrics: Recorder | None = None,
    peer: bool = False,
    admission: Admission | None = None,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """``admin`` set: a management method, called as ``behavior(request, caller)``;
    ``peer``: called as ``behavior(request, address)``.

    ``metrics`` set: every call is counted by its status code's name.
    """
    name = method.rpartition("/")[2]

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # One coroutine per call: a cache hit never awaits, and each level would cost it a frame.
        if admission is not None and not admission.try_enter():
            # A status without an exception: grpc discards the (absent) response
            # of a call whose code is not OK, and a refusal must cost as little as it can.
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(AT_CAPACITY)
            return None
        try:
            if request is _UNDECODABLE:
                if metrics is not None:
                    metrics.managed(name, grpc.StatusCode.INVALID_ARGUMENT.name)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the request could not be decoded: string fields must be valid UTF-8",
                )
            try:
                if admin is not None:
                    response = await behavior(request, admin.check(context))
                elif peer:
                    response = await behavior(request, peer_address(context.peer()))
                else:
                    response = await behavior(request)
            except Exception as exc:  # mapped in one place; a traceback never reaches the caller
                code, message = to_status(exc, method)
            else:
                if metrics is not None:
                    metrics.managed(name, "OK")
                return response
            if metrics is not None:
                metrics.managed(name, code.name)
            # A status without an exception, as for the refusal above: ``abort`` raises
            # through grpc's own handler, the dearest way to answer, and a flood of
            # unknown keys refused at capacity takes this path.
            context.set_code(code)
            context.set_details(message)
            return None
        finally:
            if admission is not None:
                admission.leave()

    return handler


#: KeyService.Authorize and Envoy's Check: their slot is taken in ``Authorizer.complete``, for what waits.
SELF_ADMITTED = frozenset({"/authsvc.v1.KeyService/Authorize", "/envoy.service.auth.v3.Authorization/Check"})


def service_handler(
    descriptor: ServiceDescriptor,
    servicer: object,
    *,
    admin: AdminTokens | None = None,
    protected: frozenset[str] = frozenset(),
    metrics: Recorder | None = None,
    admission: Admission | None = None,
) -> grpc.GenericRpcHandler:
    """Handlers for every method of ``descriptor``, implemented by ``servicer.<Method>(request)``.

    ``protected`` methods are called as ``servicer.<Method>(request, caller)``,
    with the ``Caller`` that ``admin`` authenticated, and counted by ``metrics``.
    ``admission`` (shared by every service of a process) bounds the calls in flight;
    the ``SELF_ADMITTED`` methods (Authorize, Check) take its slot only for what
    waits (``Authorizer.complete``), so a cache hit is never refused.
    """
    handlers = {}
    for method in descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming and method.server_streaming:
            # A stream ends with the status its behaviour aborts with; it makes no other calls that could raise.
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=_lenient(request_class.FromString),
                response_serializer=response_class.SerializeToString,
            )
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _wrap(
                getattr(servicer, method.name),
                f"/{descriptor.full_name}/{method.name}",
                admin if method.name in protected else None,
                metrics if method.name in protected else None,
                method.name in PEER_METHODS,
                None if f"/{descriptor.full_name}/{method.name}" in SELF_ADMITTED else admission,
            ),
            request_deserializer=_lenient(request_class.FromString),
            response_serializer=_passthrough(response_class.SerializeToString),
        )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one process's gRPC core allows its connections (enforced in C, before any Python runs)."""

    max_connections: int = 4000
    """Open connections; more are closed as they arrive. Kept below the open-file limit."""
    handshake_timeout_ms: int = 5000
    """A connection that has not completed TLS and the HTTP/2 preface by then is closed."""
    max_connection_idle_ms: int = 300_000
    """A connection with no call for this long is closed (GOAWAY); clients reconnect on demand."""
    max_queued_calls: int = 512
    """Calls the core holds before Python has taken them (``grpc.server.max_pending_requests``).

    Python takes one call at a time, and under overload it cannot even refuse
    as fast as calls arrive, so this queue is the wait no Python code can shed:
    at 5x one core's capacity, gRPC's own bound held calls here for up to a
    second. From half of it the core refuses a growing share of new calls
    (random early drop), past it all of them, with CANCELLED. The price: a
    burst of more calls than half of it, arriving at the same instant, is
    partly refused even by an idle process. Measured at 5x one core's capacity
    (``bench/runs/2026-12-02c``): 256 gave a p99 of 66-69 ms, but 200 client
    streams opening together were partly refused; 1024 absorbed them but gave
    a p99 of 249-268 ms, past Envoy's default ext_authz timeout (200 ms); 512
    gives 127 ms, the worst 166 ms, and absorbs a burst of 256. Streams per
    connection stay at gRPC's default: a limit there made clients fail with
    REFUSED_STREAM."""

    def channel_args(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.server_handshake_timeout_ms", self.handshake_timeout_ms),
            ("grpc.max_connection_idle_ms", self.max_connection_idle_ms),
            ("grpc.server.max_pending_requests", max(1, self.max_queued_calls // 2)),
            ("grpc.server.max_pending_requests_hard_limit", self.max_queued_calls),
        ]


def build_server(
    services: list[tuple[ServiceDescriptor, grpc.GenericRpcHandler]],
    health: HealthServicer,
    *,
    reuse_port: bool,
    limits: ConnectionLimits | None = None,
) -> grpc.aio.Server:
    limits = limits or ConnectionLimits()
    server = grpc.aio.server(
        options=[
            *limits.channel_args(),
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
