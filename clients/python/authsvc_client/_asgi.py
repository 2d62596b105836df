"""``AuthsvcMiddleware``: protect any ASGI application (no framework needed) with authsvc.

Per request: resolve the required scope from ``(method, path)``, read the key
(``x-api-key`` or ``authorization: ApiKey <key>``), call Authorize, then

- allowed: call the application with the key-bearing headers removed (the
  application never sees a secret), the principal in
  ``scope["state"]["authsvc_principal"]`` (Starlette: ``request.state.authsvc_principal``)
  and in ``current_principal()``, and ``RateLimit-*`` headers added to the response;
- denied: answer 401 (with ``WWW-Authenticate``), 403 or 429 (with ``Retry-After``),
  as the Envoy adapter does, with ``{"error": {"code": ..., "message": ...}}``;
- authsvc unavailable: 503 with ``Retry-After``; never the application (fail closed).

Paths are matched on whole segments (``/admin`` covers ``/admin`` and
``/admin/x``, not ``/administrator``). A path with ``.``/``..`` or empty
segments is refused with 400 before any rule applies: an application or
proxy that normalises it later would otherwise reach a route under rules
meant for another.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from authsvc_client._client import AsyncClient
from authsvc_client._credentials import TWO_KEYS, _principal, carries_key, extract_key, loggable
from authsvc_client._decision import Decision
from authsvc_client._exceptions import AuthsvcError, Unavailable

log = logging.getLogger("authsvc_client")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``(method or "*", path prefix, required scope)``; the first matching rule wins.
Rule = tuple[str, str, str]
#: ``(method, path) -> required scope``, or ``None`` when no rule covers the request (denied).
ScopeResolver = Callable[[str, str], str | None]

PRINCIPAL_STATE_KEY = "authsvc_principal"
WWW_AUTHENTICATE = 'ApiKey realm="authsvc", header="x-api-key"'


def path_matches(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it, on segment boundaries."""
    base = prefix.rstrip("/")
    return base == "" or path == base or path.startswith(base + "/")


def _canonical(path: str) -> bool:
    segments = path.split("/")[1:-1] if path.endswith("/") else path.split("/")[1:]
    return path.startswith("/") and all(s not in ("", ".", "..") for s in segments)


def _rules_resolver(rules: Sequence[Rule]) -> ScopeResolver:
    table = [(method.upper(), prefix, scope) for method, prefix, scope in rules]

    def resolve(method: str, path: str) -> str | None:
        for rule_method, prefix, scope in table:
            if rule_method in ("*", method) and path_matches(path, prefix):
                return scope
        return None

    return resolve


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    rl = decision.rate_limit
    if rl is None:
        return []
    return [
        (b"ratelimit-limit", str(rl.limit).encode()),
        (b"ratelimit-remaining", str(rl.remaining).encode()),
        (b"ratelimit-reset", str(rl.reset_seconds).encode()),
    ]


class AuthsvcMiddleware:
    """Pure-ASGI middleware: ``AuthsvcMiddleware(app, client=AsyncClient(...), scopes=[...])``.

    ``scopes`` is a list of ``(method, path_prefix, scope)`` rules (first match
    wins, ``"*"`` matches any method, ``""`` authenticates only) or a
    callable ``(method, path) -> scope | None``. A request no rule covers is
    denied with 403, so a new route is never open by accident. ``public``
    path prefixes need no key. Lifespan and other non-HTTP scopes pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncClient,
        scopes: Sequence[Rule] | ScopeResolver,
        public: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.client = client
        self.resolve = scopes if callable(scopes) else _rules_resolver(scopes)
        self.public = tuple(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not _canonical(path):
            await self._respond(scope, receive, send, 400, "bad_path", "the path has empty, '.' or '..' segments")
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        if any(path_matches(path, prefix) for prefix in self.public):
            await self._call_app(scope, receive, send, None)
            return
        key = extract_key(headers)
        method = str(scope.get("method", "GET")).upper()
        required = self.resolve(method, path)
        if required is None:
            await self._respond(scope, receive, send, 403, "forbidden", "no authorization rule covers this route")
            return
        if key is None:
            await self._deny(scope, receive, send, TWO_KEYS)
            return
        try:
            # A rule's "" is the explicit "any valid key"; the client refuses an empty scope.
            decision = await (self.client.authorize(key, required) if required else self.client.authenticate(key))
        except Unavailable as exc:
            detail = loggable(exc.message, key)
            log.warning("authsvc unavailable for %s %s (%s): %s", method, path, exc.status, detail)
            await self._respond(
                scope, receive, send, 503, "unavailable", "the authorization service is unavailable; retry later",
                [(b"retry-after", b"1")],
            )
            return
        except AuthsvcError as exc:
            # E.g. a rule names a scope authsvc does not know: the service's configuration is wrong.
            detail = loggable(exc.message, key)
            log.error("authsvc could not authorize %s %s (%s): %s", method, path, exc.status, detail)
            await self._respond(
                scope, receive, send, 500, "internal_error", "authorization failed; the server log has details"
            )
            return
        if not decision.allowed:
            await self._deny(scope, receive, send, decision)
            return
        await self._call_app(scope, receive, send, decision)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send, decision: Decision | None) -> None:
        principal = decision.principal if decision else None
        inner = dict(scope)
        inner["headers"] = [
            (k, v) for k, v in scope["headers"] if not carries_key(k.decode("latin-1").lower(), v.decode("latin-1"))
        ]
        # A copy: the server's per-request state stays untouched for anything outside this middleware.
        inner["state"] = {**(scope.get("state") or {}), PRINCIPAL_STATE_KEY: principal}
        extra = _rate_limit_headers(decision) if decision else []

        async def send_with_headers(message: Message) -> None:
            if extra and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        token = _principal.set(principal)
        try:
            await self.app(inner, receive, send_with_headers)
        finally:
            _principal.reset(token)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, decision: Decision) -> None:
        status = decision.http_status if decision.http_status in (401, 403, 429) else 403
        headers = _rate_limit_headers(decision)
        if status == 401:
            headers.append((b"www-authenticate", WWW_AUTHENTICATE.encode()))
        if status == 429:
            headers.append((b"retry-after", str(decision.retry_after).encode()))
        await self._respond(scope, receive, send, status, decision.reason.code, decision.message, headers)

    @staticmethod
    async def _respond(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = _error_body(code, message)
        all_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": all_headers})
            await send({"type": "http.response.body", "body": body})
            return
        # WebSocket: the handshake is refused before it is accepted. With the
        # denial-response extension the client gets the real status and body;
        # without it the server answers a plain 403.
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": all_headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1013 if status == 503 else 1008})
