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

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from authsvc_client._client import AsyncClient
from authsvc_client._credentials import _principal, loggable
from authsvc_client._decision import TWO_KEYS, Decision
from authsvc_client._exceptions import AuthsvcError, Unavailable
from authsvc_client._http import Answer, HttpPolicy, joined, rate_limit_headers

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
_POLICY = HttpPolicy()
_BAD_PATH = HttpPolicy.answer(400, "bad_path", "the path has empty, '.' or '..' segments")


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


def _encoded(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


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
            await self._respond(scope, receive, send, _BAD_PATH)
            return
        if any(path_matches(path, prefix) for prefix in self.public):
            await self._call_app(scope, receive, send, None)
            return
        credentials = _POLICY.credentials(
            joined((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
        )
        key = credentials.key
        method = str(scope.get("method", "GET")).upper()
        required = self.resolve(method, path)
        if required is None:
            await self._respond(scope, receive, send, _POLICY.no_rule)
            return
        if credentials.conflicting:
            await self._respond(scope, receive, send, _POLICY.denial(TWO_KEYS))
            return
        try:
            # A rule's "" is the explicit "any valid key"; the client refuses an empty scope.
            decision = await (self.client.authorize(key, required) if required else self.client.authenticate(key))
        except Unavailable as exc:
            detail = loggable(exc.message, key)
            log.warning("authsvc unavailable for %s %s (%s): %s", method, path, exc.status, detail)
            await self._respond(scope, receive, send, _POLICY.unavailable)
            return
        except AuthsvcError as exc:
            # E.g. a rule names a scope authsvc does not know: the service's configuration is wrong.
            detail = loggable(exc.message, key)
            log.error("authsvc could not authorize %s %s (%s): %s", method, path, exc.status, detail)
            await self._respond(scope, receive, send, _POLICY.failed)
            return
        if not decision.allowed:
            await self._respond(scope, receive, send, _POLICY.denial(decision))
            return
        await self._call_app(scope, receive, send, decision)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send, decision: Decision | None) -> None:
        principal = decision.principal if decision else None
        inner = dict(scope)
        inner["headers"] = [
            (k, v)
            for k, v in scope["headers"]
            if not _POLICY.carries_key(k.decode("latin-1").lower(), v.decode("latin-1"))
        ]
        # A copy: the server's per-request state stays untouched for anything outside this middleware.
        inner["state"] = {**(scope.get("state") or {}), PRINCIPAL_STATE_KEY: principal}
        extra = _encoded(rate_limit_headers(decision)) if decision else []

        async def send_with_headers(message: Message) -> None:
            if extra and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        token = _principal.set(principal)
        try:
            await self.app(inner, receive, send_with_headers)
        finally:
            _principal.reset(token)

    @staticmethod
    async def _respond(scope: Scope, receive: Receive, send: Send, answer: Answer) -> None:
        status, body = answer.status, answer.body
        all_headers = [*_encoded(answer.headers), (b"content-length", str(len(body)).encode())]
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
