"""A lean HTTP/1.1 server for one small handler: the listener of Envoy's ext_authz HTTP protocol.

Why not a framework: Envoy calls ext_authz on every request, so the
server's own cost per request bounds what Envoy can do. An asyncio protocol
on llhttp (``httptools``) costs a few microseconds per request; the request
and response objects here are the least that ext_authz needs.

Parsing is llhttp's, never ours. This module only enforces limits, keeps
responses in order and closes connections that misbehave:

- HTTP/1.1 keep-alive (HTTP/1.0 only when it asks for it); pipelined
  requests are answered in order; reading pauses while ``max_pipeline``
  answers are outstanding.
- Limits: request target (414), header count and size (431), body (413;
  a body is read and ignored up to ``max_body_bytes``, Envoy sends none).
- Malformed requests (bare ``\\r\\n`` lines, obs-fold, two Content-Length,
  Content-Length with Transfer-Encoding, upgrades) get 400 and the
  connection is closed: a request that two parsers could read differently
  is never answered as if it were fine (request smuggling).
- Timeouts: a request's head and body must arrive within
  ``request_timeout`` (408 and close: slowloris); a connection with nothing
  in flight is closed after ``idle_timeout``. One sweep per server checks
  every connection, so a request costs no timer of its own.

TLS (``HttpServer(tls=...)``): the server accepts connections itself and
hands each one to the event loop with the context ``tls()`` returns at that
moment (``loop.connect_accepted_socket``), so a replaced certificate reaches
the next connection while open ones keep theirs; an asyncio server's
context is fixed when it starts. The handshake runs in a task of its own,
bounded by ``handshake_timeout``, so a slow or plaintext client never holds
up the accept loop; a failed handshake closes the connection and is logged
at debug level only (a port scanner must not flood the log). Requests are
only ever read from a connection whose handshake completed.

Handlers are synchronous on the fast path: a handler returns a ``Response``
or, only when it has to wait (a cache miss reads the database), an
awaitable of one, which runs as a task. A cache hit costs no task and no
suspension.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import httptools
from authsvc_client._http import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one connection may send; defaults fit Envoy's check requests with room to spare."""

    max_request_target: int = 8192
    """Bytes of the request target (path and query); past it: 414."""
    max_headers: int = 100
    """Header lines per request; past it: 431."""
    max_header_bytes: int = 16384
    """Bytes of all header names and values of one request; past it: 431."""
    max_body_bytes: int = 65536
    """A body is read and ignored up to this; a larger one: 413 and close."""
    request_timeout: float = 10.0
    """Seconds from a request's first byte to its last; past it: 408 and close."""
    idle_timeout: float = 120.0
    """Seconds a connection may sit with no request; longer than Envoy's pool idle timeout, so Envoy closes first."""
    max_pipeline: int = 32
    """Answers outstanding on one connection before it stops reading."""
    handshake_timeout: float = 5.0
    """Seconds a TLS handshake may take; past it the connection is closed."""
    max_connections: int = 4000
    """Open connections (TLS handshakes in progress included); one more is closed as it arrives."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-case names; a repeated header's values joined by ``,`` (as Envoy's gRPC Check does)."""


class Response:
    """Status, headers and body; its keep-alive encoding is built once, so a memoized response costs one write."""

    __slots__ = ("_wire", "body", "headers", "status")

    def __init__(self, status: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> None:
        self.status = status
        self.headers = tuple(headers)
        self.body = body
        self._wire: bytes | None = None

    def encode(self, *, head_only: bool = False, close: bool = False) -> bytes:
        """The bytes on the wire; HEAD gets the head only (a body there would be read as the next response)."""
        if not head_only and not close and self._wire is not None:
            return self._wire
        lines = [f"HTTP/1.1 {self.status} {_reason(self.status)}"]
        for name, value in self.headers:
            if any(c in name or c in value for c in "\r\n\0"):
                # Header injection: a value from data must never start a header of its own.
                raise ValueError(f"response header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        lines.append(f"content-length: {len(self.body)}")
        if close:
            lines.append("connection: close")
        # UTF-8, as Envoy sends gRPC Check's header strings on: a label value keeps its bytes either way.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        if head_only:
            return head
        wire = head + self.body
        if not close:
            self._wire = wire
        return wire


Handler = Callable[[Request], "Response | Awaitable[Response]"]


def error_response(status: int, code: str, message: str) -> Response:
    """A JSON error in the one body format every authsvc front end uses (``authsvc_client._http``)."""
    return Response(status, (("content-type", "application/json"),), error_body(code, message))


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Refused(Exception):
    """Raised inside a parser callback: answer ``response`` and close."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Ignored(Exception):
    """Raised inside a parser callback: a request after the connection's last one; it is not read."""


def _bad(message: str) -> _Refused:
    return _Refused(error_response(400, "bad_request", message))


_INTERNAL = error_response(500, "internal", "the server failed to answer; see its log")
_Pending = bytes | asyncio.Task[bytes]


class HttpConnection(asyncio.Protocol):
    """One client connection: llhttp's callbacks in, responses out in request order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._closing = False
        self._eof = False
        self._paused = False
        self._reading_request = False
        self._in_head = False
        self._messages = 0
        self._head_bytes = 0
        self._url: list[bytes] = []
        self._url_bytes = 0
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._header_bytes = 0
        self._body_bytes = 0
        self.deadline = math.inf

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._server.full(handshaking=0):
            self._closing = True
            self._transport.abort()  # over the cap: closed as it arrives, before a byte is read
            return
        self._server.connections.add(self)
        self.deadline = self._loop.time() + self._limits.idle_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        for item in self._pending:
            if not isinstance(item, bytes):
                item.cancel()
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after a refusal or ``connection: close`` nothing more is read
        was_in_head, message = self._in_head, self._messages
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if self._closing or isinstance(cause, _Ignored):
                return
            if isinstance(cause, _Refused):
                self._refuse(cause.response)
            else:
                log.error("HTTP request handling failed", exc_info=cause or exc)
                self._refuse(_INTERNAL)
            return
        except httptools.HttpParserUpgrade:
            if self._closing:
                return
            self._refuse(error_response(400, "bad_request", "protocol upgrades are not supported"))
            return
        except httptools.HttpParserError as exc:
            if self._closing:
                return  # e.g. bytes after ``connection: close``: the answer is already on its way
            self._refuse(error_response(400, "bad_request", f"malformed HTTP request: {_parser_reason(exc)}"))
            return
        if self._in_head and was_in_head and message == self._messages:
            # httptools buffers a header line until it ends: bound what a
            # client can make it buffer across reads (a never-ending header).
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes + self._limits.max_request_target:
                self._refuse(_too_large_headers().response)

    def eof_received(self) -> bool | None:
        self._eof = self._closing = True
        if not self._pending and self._transport is not None:
            self._transport.close()
        return True  # half-close: answers still outstanding go out, then the connection closes

    # -- llhttp callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing:
            raise _Ignored
        self._messages += 1
        self._reading_request = self._in_head = True
        self._head_bytes = self._url_bytes = self._header_count = self._header_bytes = self._body_bytes = 0
        self._url = []
        self._headers = {}
        self.deadline = self._loop.time() + self._limits.request_timeout

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self._limits.max_request_target:
            raise _Refused(
                error_response(
                    414, "uri_too_long", f"the request target is longer than {self._limits.max_request_target} bytes"
                )
            )
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self._limits.max_headers or self._header_bytes > self._limits.max_header_bytes:
            raise _too_large_headers()
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        if key in headers:
            if key == "content-length":
                raise _bad("more than one Content-Length")
            headers[key] = f"{headers[key]},{text}"
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _bad("only HTTP/1.1 and HTTP/1.0 are served")
        if parser.should_upgrade() or parser.get_method() == b"CONNECT":
            raise _bad("protocol upgrades and CONNECT are not supported")
        headers = self._headers
        if "transfer-encoding" in headers and "content-length" in headers:
            raise _bad("both Content-Length and Transfer-Encoding")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes:
            raise _body_too_large(self._limits.max_body_bytes)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _body_too_large(self._limits.max_body_bytes)

    def on_message_complete(self) -> None:
        self._reading_request = False
        method = self._parser.get_method().decode("ascii")
        keep_alive = self._parser.should_keep_alive()
        request = Request(method, b"".join(self._url).decode("latin-1"), self._headers)
        head_only = method == "HEAD"
        try:
            result = self._server.handler(request)
        except Exception:
            log.exception("HTTP handler failed")
            result = _INTERNAL
        if isinstance(result, Response):
            self._send(self._encode(result, head_only, not keep_alive))
        else:
            task = self._loop.create_task(self._await(result, head_only, not keep_alive))
            self._pending.append(task)
            task.add_done_callback(self._flush)
            if len(self._pending) >= self._limits.max_pipeline and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()
        if not keep_alive:
            self._closing = True
            self._flush()
        elif not self._pending:
            self.deadline = self._loop.time() + self._limits.idle_timeout
        else:
            self.deadline = math.inf  # the handler is bounded (the store timeout); idle starts when it is done

    # -- responses --------------------------------------------------------

    @staticmethod
    def _encode(response: Response, head_only: bool, close: bool) -> bytes:
        try:
            return response.encode(head_only=head_only, close=close)
        except ValueError:
            log.exception("HTTP handler built an invalid response")
            return _INTERNAL.encode(head_only=head_only, close=close)

    async def _await(self, result: Awaitable[Response], head_only: bool, close: bool) -> bytes:
        try:
            response = await result
        except Exception:
            log.exception("HTTP handler failed")
            response = _INTERNAL
        return self._encode(response, head_only, close)

    def _send(self, wire: bytes) -> None:
        if self._pending:
            self._pending.append(wire)  # behind an answer still being computed: order is the protocol
        elif self._transport is not None:
            self._transport.write(wire)

    def _flush(self, _: object = None) -> None:
        pending = self._pending
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        while pending:
            head = pending[0]
            if isinstance(head, bytes):
                transport.write(head)
            elif head.done():
                if head.cancelled():
                    transport.close()
                    return
                transport.write(head.result())
            else:
                break
            pending.popleft()
        if self._closing and not pending:
            self._finish(transport)
            return
        if self._paused and len(pending) < self._limits.max_pipeline:
            self._paused = False
            transport.resume_reading()
        if not pending and not self._reading_request:
            self.deadline = self._loop.time() + self._limits.idle_timeout

    def _finish(self, transport: asyncio.Transport) -> None:
        """Send FIN after the last answer, and drop what the client still sends until it closes too.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the answer before the client reads it (a 431 to a
        client still sending its endless header). The linger is bounded by
        the deadline: the sweep aborts a client that never closes.
        """
        self.deadline = min(self.deadline, self._loop.time() + 1.0)
        if self._eof or not transport.can_write_eof():
            transport.close()
        else:
            transport.write_eof()

    def _refuse(self, response: Response) -> None:
        """Answer after everything already accepted, then close: nothing after a bad request is read."""
        if self._closing:
            return  # already closing: its last answer is queued
        self._closing = True
        self._reading_request = False
        self.deadline = self._loop.time() + self._limits.request_timeout  # bounds answers still in flight
        self._send(response.encode(close=True))
        self._flush()

    # -- timeouts and shutdown ----------------------------------------------

    def expire(self) -> None:
        """Called by the server's sweep once ``deadline`` has passed."""
        transport = self._transport
        if transport is None:
            return
        if self._closing:
            transport.abort()
        elif self._reading_request:
            self._refuse(error_response(408, "request_timeout", "the request did not arrive in time"))
        else:
            transport.close()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._pending and not self._reading_request and self._transport is not None:
            self._finish(self._transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _too_large_headers() -> _Refused:
    return _Refused(error_response(431, "headers_too_large", "too many or too large request headers"))


def _body_too_large(limit: int) -> _Refused:
    message = f"request bodies are ignored, and refused past {limit} bytes"
    return _Refused(error_response(413, "body_too_large", message))


def _parser_reason(exc: httptools.HttpParserError) -> str:
    # llhttp's reason ("Invalid header value char", ...) names the problem; never echo request bytes.
    return str(exc.args[0]) if exc.args else type(exc).__name__


class HttpServer:
    """The listener: its connections, their timeouts, and an orderly stop.

    ``tls``: called for each new connection, the server context it gets
    (TLS only, see the module docstring); ``None`` serves plaintext.
    """

    def __init__(
        self, handler: Handler, limits: Limits | None = None, *, tls: Callable[[], ssl.SSLContext] | None = None
    ) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.connections: set[HttpConnection] = set()
        self.loop = asyncio.get_running_loop()
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, listen: str, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port``; the bound port (``:0`` picks one). Raises ``OSError`` when the port is taken."""
        host, _, port = listen.rpartition(":")
        tls = self._tls
        if tls is None:
            self._server = await self.loop.create_server(
                lambda: HttpConnection(self), host.strip("[]"), int(port), reuse_port=reuse_port or None, backlog=1024
            )
            bound = int(self._server.sockets[0].getsockname()[1])
        else:
            self._listeners = _bind(host.strip("[]"), int(port), reuse_port)
            self._acceptors = [
                self.loop.create_task(self._accept(listener, tls), name="authsvc-http-accept")
                for listener in self._listeners
            ]
            bound = int(self._listeners[0].getsockname()[1])
        self._sweeper = self.loop.create_task(self._sweep(), name="authsvc-http-timeouts")
        return bound

    async def _accept(self, listener: socket.socket, tls: Callable[[], ssl.SSLContext]) -> None:
        short_of_files = False
        while True:
            try:
                sock, _ = await self.loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, ...: back off, as asyncio's own server does
                if not short_of_files:
                    log.warning("the HTTP ext_authz listener cannot accept connections (%s); retrying", exc)
                short_of_files = True
                await asyncio.sleep(0.5)
                continue
            short_of_files = False
            if self.full(handshaking=len(self._handshakes)):
                sock.close()  # over the cap: no handshake is spent on it
                continue
            task = self.loop.create_task(self._handshake(sock, tls()))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """TLS on one accepted connection; only then does it become an ``HttpConnection``."""
        try:
            await self.loop.connect_accepted_socket(
                lambda: HttpConnection(self),
                sock,
                ssl=context,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # a plaintext client, a wrong or missing certificate, a timeout, a reset
            sock.close()
            log.debug("TLS handshake on the HTTP ext_authz listener failed; connection closed: %r", exc)

    def full(self, handshaking: int) -> bool:
        """Whether the connection cap is reached (those still shaking hands count: each holds a descriptor)."""
        return len(self.connections) + handshaking >= self.limits.max_connections

    async def _sweep(self) -> None:
        period = min(1.0, max(0.02, min(self.limits.request_timeout, self.limits.idle_timeout) / 4))
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for connection in [c for c in self.connections if c.deadline <= now]:
                connection.expire()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let answers in flight go out (up to ``grace``), then cut what is left."""
        if self._server is not None:
            self._server.close()
        for task in (*self._acceptors, *self._handshakes):
            task.cancel()
        for task in (*self._acceptors, *self._handshakes):  # done waiting on their sockets before those close
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in self._listeners:
            listener.close()
        for connection in list(self.connections):
            connection.close_when_idle()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:  # noqa: ASYNC110  # many connections, no one event to wait on
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()


def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets on every address of ``host``, as ``loop.create_server`` binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
