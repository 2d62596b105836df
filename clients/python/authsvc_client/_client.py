"""``Client`` (blocking) and ``AsyncClient`` (asyncio): ``authorize(key, scope)`` and ``authenticate(key)``.

``authorize`` requires a scope: an empty one used to mean "any valid key",
so a caller that forgot the scope allowed every key. Asking only whether a
key is valid is its own, explicit call, ``authenticate``.

Both wrap the generated ``KeyService`` stub and translate its two kinds of
outcome: a ``Decision`` (allowed or denied: an answer) and an
``AuthsvcError`` (no answer: fail closed). Every call carries a deadline,
short by default, because authsvc sits on the hot path of every request:
a slow answer must turn into a quick ``Unavailable``, not a hung request.
"""

from __future__ import annotations

from types import TracebackType

import grpc

from authsvc_client._decision import Decision, Principal, RateLimit, Reason
from authsvc_client._exceptions import InvalidArgument, from_rpc_error
from authsvc_client._localcache import CacheStats, LocalCache
from authsvc_client._tls import TlsConfig
from authsvc_client._watch import AsyncWatch, ThreadWatch
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1.authsvc_pb2_grpc import KeyServiceStub

#: Seconds an Authorize call may take before it fails with ``Unavailable``.
#: authsvc answers in a few milliseconds; Envoy's ext_authz default is 200 ms.
DEFAULT_TIMEOUT = 0.25
#: Keys a client caches by default (see ``_localcache``); ``cache_size=0`` turns the cache off.
DEFAULT_CACHE_SIZE = 10_000


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
            labels=tuple(sorted(p.labels.items())) if p.labels else (),
        )
    rate_limit = None
    if reply.HasField("rate_limit"):
        r = reply.rate_limit
        rate_limit = RateLimit(limit=r.limit, remaining=r.remaining, reset_seconds=r.reset_seconds)
    reason = _reason(reply.reason)
    # Fail closed on an inconsistent answer: "allowed" needs both the flag and REASON_OK.
    if reason is Reason.OK and not reply.allowed:
        reason = Reason.UNSPECIFIED
    allowed = reason is Reason.OK
    return Decision(
        reason,
        principal,
        rate_limit,
        http_status=reply.http_status if allowed or reply.http_status >= 400 else 403,
        message=reply.message,
    )


_NEEDS_SCOPE = (
    "authorize(key, scope) needs a non-empty scope; "
    "to check only that the key is valid, whatever it may do, call authenticate(key)"
)


def _secure(
    credentials: grpc.ChannelCredentials | None, tls: TlsConfig | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    if credentials is not None and tls is not None:
        raise ValueError("pass either credentials or tls, not both")
    if tls is not None:
        return tls.credentials(), tls.options()
    return credentials, []


def _check(key: str, scope: str) -> None:
    if not isinstance(key, str) or not isinstance(scope, str):
        # No repr of the value: it may be a secret of the wrong type.
        raise TypeError("authorize(key, scope) takes two str arguments")
    if not scope.strip():
        raise InvalidArgument(_NEEDS_SCOPE, status="INVALID_ARGUMENT")


def _check_authenticate(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError("authenticate(key) takes a str argument")


def _expire_at(reply: pb.AuthorizeResponse) -> float | None:
    return reply.expire_time.ToMicroseconds() / 1_000_000 if reply.HasField("expire_time") else None


_OFF = CacheStats(0, 0, 0, "off", 0, 0)


class Client:
    """Blocking client for authsvc, safe to share between threads.

    ``Client("authsvc:50051")`` opens (and on ``close()`` closes) an insecure
    channel, or a TLS one with ``tls=TlsConfig(...)`` (or ready-made gRPC
    ``credentials``); ``Client(channel)`` uses a channel you own and leaves it open.
    """

    def __init__(
        self,
        target: str | grpc.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TlsConfig | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        credentials, options = _secure(credentials, tls)
        if isinstance(target, str):
            if credentials is None:
                self._channel = grpc.insecure_channel(target)
            else:
                self._channel = grpc.secure_channel(target, credentials, options=options)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._authorize = KeyServiceStub(self._channel).Authorize
        self.timeout = timeout
        self._local = LocalCache(cache_size) if cache_size > 0 else None
        self._watch = ThreadWatch(self._local, self._channel) if self._local is not None else None

    def authorize(self, key: str, scope: str, *, timeout: float | None = None) -> Decision:
        """Whether ``key`` may act with ``scope``.

        Returns a ``Decision`` for allowed and denied keys alike. Raises
        ``Unavailable`` when authsvc cannot answer within the deadline and
        ``InvalidArgument`` when ``scope`` is empty (see ``authenticate``)
        or not in authsvc's catalog.
        """
        _check(key, scope)
        return self._send(key, scope, timeout)

    def authenticate(self, key: str, *, timeout: float | None = None) -> Decision:
        """Whether ``key`` is valid (known, not revoked, not expired, within its rate limit), whatever its scopes.

        For callers that decide by ``decision.principal`` themselves; anything
        that protects an operation should ``authorize`` it with its scope.
        """
        _check_authenticate(key)
        return self._send(key, "", timeout)  # no required_scope: authsvc only identifies the key

    def cache_stats(self) -> CacheStats:
        """Hits, misses, entries and the stream's state of this client's cache."""
        return self._local.stats() if self._local is not None else _OFF

    def _send(self, key: str, scope: str, timeout: float | None) -> Decision:
        local, epoch = self._local, 0
        if local is not None:
            hit = local.lookup(key, scope)
            if hit is not None:
                return hit
            assert self._watch is not None
            self._watch.ensure()
            epoch = local.begin()
        try:
            reply = self._authorize(
                pb.AuthorizeRequest(key=key, required_scope=scope), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        decision = decision_from_proto(reply)
        if local is not None:
            local.learn(key, scope, decision, _expire_at(reply), reply.cacheable, epoch)
        return decision

    def close(self) -> None:
        """Stop the cache's stream, and close the channel if this client opened it."""
        if self._watch is not None:
            self._watch.stop()
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client for authsvc (``grpc.aio``).

    ``AsyncClient("authsvc:50051")`` opens its own channel on the first call
    (and closes it on ``await close()``). A ``grpc.aio`` channel belongs to
    the event loop it was created in, so deferring it lets an application
    build the client at import time, before its server starts the loop.
    ``AsyncClient(channel)`` uses a ``grpc.aio.Channel`` you own and leaves it open.
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TlsConfig | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._target = target if isinstance(target, str) else None
        self._credentials, self._options = _secure(credentials, tls)
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.UnaryUnaryMultiCallable[pb.AuthorizeRequest, pb.AuthorizeResponse] | None = None
        self._owns_channel = isinstance(target, str)
        if not isinstance(target, str):
            self._bind(target)
        self.timeout = timeout
        self._local = LocalCache(cache_size) if cache_size > 0 else None
        self._watch = AsyncWatch(self._local) if self._local is not None else None

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        # The stub's typing gives grpc.aio channels an awaitable Authorize.
        self._call = KeyServiceStub(channel).Authorize

    def _open(self) -> grpc.aio.UnaryUnaryMultiCallable[pb.AuthorizeRequest, pb.AuthorizeResponse]:
        if self._call is None:
            assert self._target is not None
            if self._credentials is None:
                self._bind(grpc.aio.insecure_channel(self._target))
            else:
                self._bind(grpc.aio.secure_channel(self._target, self._credentials, options=self._options))
        assert self._call is not None
        return self._call

    # The timeout is a gRPC deadline: it travels to authsvc (grpc-timeout), which
    # stops working on an answer nobody waits for; asyncio.timeout cannot do that.
    async def authorize(self, key: str, scope: str, *, timeout: float | None = None) -> Decision:  # noqa: ASYNC109
        """Whether ``key`` may act with ``scope``; see ``Client.authorize``."""
        _check(key, scope)
        local = self._local
        if local is not None:  # the hit path: no await on anything but this coroutine
            hit = local.lookup(key, scope)
            if hit is not None:
                return hit
        return await self._send(key, scope, timeout)

    async def authenticate(self, key: str, *, timeout: float | None = None) -> Decision:  # noqa: ASYNC109
        """Whether ``key`` is valid, whatever its scopes; see ``Client.authenticate``."""
        _check_authenticate(key)
        local = self._local
        if local is not None:
            hit = local.lookup(key, "")
            if hit is not None:
                return hit
        return await self._send(key, "", timeout)

    def cache_stats(self) -> CacheStats:
        """Hits, misses, entries and the stream's state of this client's cache."""
        return self._local.stats() if self._local is not None else _OFF

    async def _send(self, key: str, scope: str, timeout: float | None) -> Decision:  # noqa: ASYNC109
        call = self._open()
        local, epoch = self._local, 0
        if local is not None:
            assert self._watch is not None and self._channel is not None
            self._watch.ensure(self._channel)
            epoch = local.begin()
        try:
            reply = await call(
                pb.AuthorizeRequest(key=key, required_scope=scope), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        decision = decision_from_proto(reply)
        if local is not None:
            local.learn(key, scope, decision, _expire_at(reply), reply.cacheable, epoch)
        return decision

    async def close(self) -> None:
        """Stop the cache's stream, and close the channel if this client opened it; a later call opens a new one."""
        if self._watch is not None:
            await self._watch.stop()
        if self._owns_channel and self._channel is not None:
            channel, self._channel, self._call = self._channel, None, None
            await channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
