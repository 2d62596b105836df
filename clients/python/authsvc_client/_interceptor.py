"""gRPC server interceptors that protect a service's methods with authsvc.

``AuthzServerInterceptor`` (``grpc.server``) and
``AsyncAuthzServerInterceptor`` (``grpc.aio.server``) resolve each call's
required scope from the full method name, read the key from the incoming
metadata (``x-api-key`` or ``authorization: ApiKey <key>``), call Authorize,
and either run the handler with ``current_principal()`` set or abort:

==========================  ============================
authsvc answer              gRPC status
==========================  ============================
401 (missing, malformed,    UNAUTHENTICATED
unknown, revoked, expired)
403 (insufficient scope)    PERMISSION_DENIED
429 (rate limited)          RESOURCE_EXHAUSTED (+ ``retry-after`` trailer)
no answer (Unavailable)     UNAVAILABLE: fail closed
any other failure           INTERNAL (logged; e.g. a scope authsvc does not know)
method without a rule       PERMISSION_DENIED (fail closed)
==========================  ============================

The key is never logged and never put into a status message.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

import grpc

from authsvc_client._client import AsyncClient, Client
from authsvc_client._credentials import _principal, loggable
from authsvc_client._decision import TWO_KEYS, Decision, Principal
from authsvc_client._exceptions import AuthsvcError, Unavailable
from authsvc_client._http import Answer, HttpPolicy, joined

log = logging.getLogger("authsvc_client")

# Generic only in the type stubs, hence the string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}
#: Keys are read from metadata exactly as the HTTP policy reads them from headers.
_POLICY = HttpPolicy()
_NO_RULE = "no authorization rule covers this method"
_BUILDERS: dict[str, Callable[..., Handler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
_C = TypeVar("_C", bound=Client | AsyncClient)


class _Denial(Exception):
    """An abort to perform: status, message and trailing metadata (never the key)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


class MethodPolicy:
    """Which scope each full method name (``/package.Service/Method``) needs.

    Lookup order: the exact method in ``scopes``, then ``/package.Service/*``,
    then ``default_scope``. Methods in ``public`` (exact or ``/Service/*``)
    need no key. With ``default_scope=None`` (the default) a method covered by
    no rule is denied, so a newly added method is never open by accident;
    ``default_scope=""`` (or a rule's ``""``) only authenticates: any valid key
    passes, through the client's explicit ``authenticate``.
    """

    def __init__(
        self, scopes: Mapping[str, str], *, default_scope: str | None = None, public: Iterable[str] = ()
    ) -> None:
        self.scopes = dict(scopes)
        self.default_scope = default_scope
        self.public = frozenset(public)

    @staticmethod
    def _service_wildcard(method: str) -> str:
        return method.rpartition("/")[0] + "/*"

    def is_public(self, method: str) -> bool:
        return method in self.public or self._service_wildcard(method) in self.public

    def required_scope(self, method: str) -> str | None:
        """The scope to ask Authorize for, or ``None`` when no rule covers the method."""
        scope = self.scopes.get(method)
        if scope is None:
            scope = self.scopes.get(self._service_wildcard(method), self.default_scope)
        return scope


def _key(metadata: Iterable[Any] | None) -> str | None:
    """The call's key: ``""`` when it has none, ``None`` when it carries two different ones."""
    credentials = _POLICY.credentials(joined(metadata or ()))
    return None if credentials.conflicting else credentials.key


def _from_answer(answer: Answer) -> _Denial:
    """The gRPC form of an HTTP policy answer: its code, message and ``retry-after`` as a trailer."""
    retry_after = answer.retry_after
    trailers = (("retry-after", retry_after),) if retry_after is not None else ()
    return _Denial(_STATUS_BY_CODE[answer.grpc_code], answer.message, trailers)


def _denial_for(decision: Decision) -> _Denial:
    return _from_answer(_POLICY.denial(decision))


def _denial_for_error(exc: AuthsvcError, method: str, key: str) -> _Denial:
    detail = loggable(exc.message, key)
    if isinstance(exc, Unavailable):
        log.warning("authsvc unavailable while authorizing %s (%s): %s", method, exc.status, detail)
        return _from_answer(_POLICY.unavailable)
    # A scope authsvc does not know, or a server fault: the service's configuration
    # needs fixing, the caller cannot do anything about it.
    log.error("authsvc could not authorize %s (%s): %s", method, exc.status, detail)
    return _from_answer(_POLICY.failed)


class _Protecting(Generic[_C]):
    """What both interceptors hold: the authsvc client and the policy of the service's methods."""

    def __init__(
        self,
        client: _C,
        scopes: Mapping[str, str],
        *,
        default_scope: str | None = None,
        public: Iterable[str] = (),
    ) -> None:
        self.client = client
        self.policy = MethodPolicy(scopes, default_scope=default_scope, public=public)


def _same_kind(handler: Handler, behaviour_for: Callable[[Callable[..., Any], bool], Callable[..., Any]]) -> Handler:
    """A handler of ``handler``'s kind and (de)serializers, so the request still decodes.

    Its behaviour is ``behaviour_for(original behaviour, whether responses stream)``.
    """
    kind = next((k for k in _BUILDERS if getattr(handler, k) is not None), "stream_stream")
    return _BUILDERS[kind](
        behaviour_for(getattr(handler, kind), kind.endswith("_stream")),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthzServerInterceptor(_Protecting[Client], grpc.ServerInterceptor):
    """Protects a ``grpc.server`` (thread pool): Authorize runs in the handler's worker thread.

    The check wraps the method's behaviour instead of running in
    ``intercept_service``, which grpcio calls on its single polling thread:
    a blocking Authorize there would serialise every call of the server.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.policy.is_public(method):
            return handler
        scope = self.policy.required_scope(method)
        key = _key(handler_call_details.invocation_metadata)

        def check(context: grpc.ServicerContext) -> contextvars.Context:
            outcome = self._check(method, key, scope)
            if isinstance(outcome, _Denial):
                if outcome.trailers:
                    context.set_trailing_metadata(outcome.trailers)
                context.abort(outcome.code, outcome.message)
            # The principal lives in a context of this call only: worker threads
            # are reused, so setting it on the thread would leak it to the next call.
            call_context = contextvars.copy_context()
            call_context.run(_principal.set, outcome)
            return call_context

        return _guarded(handler, check)

    def _check(self, method: str, key: str | None, scope: str | None) -> _Denial | Principal | None:
        """The abort to perform, or the principal to run the handler with."""
        if scope is None:
            return _Denial(grpc.StatusCode.PERMISSION_DENIED, _NO_RULE)
        if key is None:
            return _denial_for(TWO_KEYS)
        try:
            decision = self.client.authorize(key, scope) if scope else self.client.authenticate(key)
        except AuthsvcError as exc:
            return _denial_for_error(exc, method, key)
        if not decision.allowed:
            return _denial_for(decision)
        return decision.principal


def _iterate_in(context: contextvars.Context, iterator: Iterator[Any]) -> Iterator[Any]:
    while True:
        try:
            item = context.run(next, iterator)
        except StopIteration:
            return
        yield item


def _guarded(handler: Handler, check: Callable[[grpc.ServicerContext], contextvars.Context]) -> Handler:
    """The same handler, with ``check`` run first and the behaviour run in the context it returns."""

    def guard(behaviour: Callable[..., Any], streams_responses: bool) -> Callable[..., Any]:
        if streams_responses:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call_context = check(context)
                return _iterate_in(call_context, call_context.run(behaviour, request, context))

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            return check(context).run(behaviour, request, context)

        return unary

    return _same_kind(handler, guard)


class AsyncAuthzServerInterceptor(_Protecting[AsyncClient], grpc.aio.ServerInterceptor):
    """Protects a ``grpc.aio.server``: Authorize is awaited before the handler is chosen.

    grpc.aio runs each call in its own task and calls the interceptor inside
    it, so the principal set here is seen by that call's handler only.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Handler | None = await continuation(handler_call_details)
        method = handler_call_details.method
        # Set on every call, public ones too, so nothing can ever be inherited.
        _principal.set(None)
        if handler is None or self.policy.is_public(method):
            return handler
        scope = self.policy.required_scope(method)
        key = _key(handler_call_details.invocation_metadata)
        if scope is None:
            return _aborting(handler, _Denial(grpc.StatusCode.PERMISSION_DENIED, _NO_RULE))
        if key is None:
            return _aborting(handler, _denial_for(TWO_KEYS))
        try:
            decision = await (self.client.authorize(key, scope) if scope else self.client.authenticate(key))
        except AuthsvcError as exc:
            return _aborting(handler, _denial_for_error(exc, method, key))
        if not decision.allowed:
            return _aborting(handler, _denial_for(decision))
        _principal.set(decision.principal)
        return handler


def _aborting(handler: Handler, denial: _Denial) -> Handler:
    """A handler of the same kind (so the request still decodes) that only aborts."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(denial.code, denial.message, trailing_metadata=denial.trailers)

    return _same_kind(handler, lambda _behaviour, _streams_responses: abort)
