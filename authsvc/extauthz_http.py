"""Envoy's ext_authz HTTP protocol (``http_service``): the same rules as ``Check``, answered over plain HTTP/1.1.

A thin translation of ``extauthz.evaluate``'s ``Outcome`` (the rules live
there and in ``HttpPolicy``, once for both protocols):

- Envoy forwards the client's method, its path under ``path_prefix`` and
  the headers its ``allowed_headers`` lets through. The route's settings
  arrive as headers Envoy adds per route
  (``check_settings.http_service.authorization_request.headers_to_add``):
  ``x-authsvc-required-scope: <scope>`` and ``x-authsvc-public: "true"``.
  The shipped config lists both in ``disallowed_headers``, so only Envoy
  sets them, never the client.
- Allowed: 200 with the identity headers (Envoy copies them upstream through
  ``allowed_upstream_headers``, replacing forged ones) and
  ``x-envoy-auth-headers-to-remove`` naming every key-bearing header, every
  other forged identity header, and the route headers (which the client may
  have sent; authsvc never sees those, Envoy drops them before asking).
  Org and key id reach the access log through ``dynamic_metadata_from_headers``.
- Denied: the real status with the JSON error body, ``WWW-Authenticate`` on
  401 and ``Retry-After``/``RateLimit-*`` on 429, passed on through
  ``allowed_client_headers``.
- Store unreachable: 503 at once (within ``AUTHSVC_STORE_TIMEOUT_MS``);
  Envoy treats any 5xx from the authorization server as an error and
  answers ``status_on_error``. A misconfigured route is a 500 for the same
  reason: the client sees 503, the authsvc log says what is wrong.
- ``GET /healthz`` is for Envoy's health check: 204 while the database is
  reachable, 503 otherwise. Never 200, the answer that would allow: a
  client path that reaches it (a config without ``path_prefix``) is denied.

A cache hit is answered synchronously (``KeyService.authorize_cached``): no
task, no suspension; allowed answers are memoized per principal, like Check's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from authsvc import extauthz
from authsvc.errors import InvalidArgument, Unavailable
from authsvc.extauthz import HttpPolicy, Outcome, Question
from authsvc.http_server import Request, Response, error_response
from authsvc.keys import Decision, Principal
from authsvc.memo import PrincipalMemo
from authsvc.service import KeyService

REQUIRED_SCOPE_HEADER = "x-authsvc-required-scope"
PUBLIC_ROUTE_HEADER = "x-authsvc-public"
ROUTE_HEADERS = (REQUIRED_SCOPE_HEADER, PUBLIC_ROUTE_HEADER)
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
HEALTH_PATH = "/healthz"
_NO_ROUTE_SETTINGS: Mapping[str, str] = {}
_JSON = ("content-type", "application/json")
_UNAVAILABLE = error_response(503, "unavailable", "authsvc cannot verify keys right now; retry later")
_MISCONFIGURED = error_response(500, extauthz.MISCONFIGURED_ROUTE, extauthz.MISCONFIGURED_MESSAGE)
_HEALTHY = Response(204)
_UNHEALTHY = error_response(503, "unavailable", "authsvc cannot reach its database")


def route_settings(headers: Mapping[str, str]) -> Mapping[str, str]:
    """The route headers in the form ``HttpPolicy`` reads Check's ``context_extensions``."""
    if REQUIRED_SCOPE_HEADER not in headers and PUBLIC_ROUTE_HEADER not in headers:
        return _NO_ROUTE_SETTINGS
    settings = {}
    if REQUIRED_SCOPE_HEADER in headers:
        settings["scope"] = headers[REQUIRED_SCOPE_HEADER]
    if PUBLIC_ROUTE_HEADER in headers:
        settings["public"] = headers[PUBLIC_ROUTE_HEADER]
    return settings


class HttpAuthorizationAdapter:
    """The ``http_server`` handler: one Envoy check request in, its answer out."""

    def __init__(self, service: KeyService, policy: HttpPolicy) -> None:
        self._service = service
        self._policy = policy
        self._allowed: PrincipalMemo[tuple[str, tuple[str, ...]], Response] = PrincipalMemo()
        self._public: dict[tuple[str, ...], Response] = {}
        self.serving = True
        """Set by the app from the same database watch as gRPC health."""

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        if request.path == HEALTH_PATH:
            return _HEALTHY if self.serving else _UNHEALTHY
        headers = request.headers
        question = extauthz.route_question(self._policy, request.method, headers, route_settings(headers))
        if isinstance(question, Outcome):
            return self.answer(question)
        try:
            decision = self._service.authorize_cached(question.key, question.scope)
        except InvalidArgument:
            return self.answer(question.misconfigured())
        if decision is not None:
            return self.answer(question.answered(decision))
        return self._look_up(question)

    async def _look_up(self, question: Question) -> Response:
        """A cache miss (or a rate-limited key): the one path that waits, on the database or Redis."""
        try:
            decision = await self._service.authorize(question.key, question.scope)
        except InvalidArgument:
            return self.answer(question.misconfigured())
        except Unavailable:
            return _UNAVAILABLE
        return self.answer(question.answered(decision))

    def answer(self, outcome: Outcome) -> Response:
        decision = outcome.decision
        if outcome.misconfigured is not None:
            extauthz.log_misconfigured(outcome.misconfigured)
            return _MISCONFIGURED
        if decision is None:
            return self._public_answer(outcome.strip)
        if not decision.allowed:
            return self.denied(decision)
        principal = decision.principal
        assert principal is not None  # an allow always identifies the key
        if decision.rate_limit is not None:  # counters differ on every call
            return self._build_allowed(decision, principal, outcome.strip)
        return self._allowed.get_or_build(
            (principal.key_id, outcome.strip),
            principal,
            lambda: self._build_allowed(decision, principal, outcome.strip),
        )

    def _removal(self, strip: tuple[str, ...], keep: Mapping[str, str] = _NO_ROUTE_SETTINGS) -> tuple[str, str]:
        names = dict.fromkeys(name for name in (*strip, *ROUTE_HEADERS) if name not in keep)
        return (REMOVE_HEADER, ",".join(names))

    def _public_answer(self, strip: tuple[str, ...]) -> Response:
        hit = self._public.get(strip)
        if hit is None:
            if len(self._public) >= 1000:
                self._public.clear()  # bounded: header-name sets come from clients
            hit = self._public[strip] = Response(200, (self._removal(strip),))
        return hit

    def _build_allowed(self, decision: Decision, principal: Principal, strip: tuple[str, ...]) -> Response:
        identity = extauthz.identity_fields(principal, self._policy.identity_prefix)
        headers = [
            *identity.items(),
            # Set, not appended, by Envoy: a forged header of the same name is replaced.
            # The other forged ones and every key-bearing header are removed.
            self._removal(strip, keep=identity),
            *extauthz.rate_limit_fields(decision),
        ]
        return Response(200, headers)

    def denied(self, decision: Decision) -> Response:
        headers = [_JSON, *extauthz.denial_fields(decision, self._policy)]
        body = extauthz.error_body(decision.reason.code, decision.message).encode()
        return Response(decision.http_status, headers, body)
