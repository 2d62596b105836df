"""Envoy's ext_authz HTTP protocol (``http_service``): the same rules as ``Check``, answered over plain HTTP/1.1.

A thin translation of ``extauthz.RoutePolicy``'s ``Outcome`` (the request
rules live there, key reading and denials in the one HTTP policy,
``authsvc_client._http``, once for both protocols):

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
  ``allowed_client_headers``. Where the key was identified (403, revoked or
  expired 401, 429) the org and key id go along for the access log; Envoy
  passes them to the client only if ``allowed_client_headers`` says so (the
  shipped config does not).
- Store unreachable: 503 at once (within ``AUTHSVC_STORE_TIMEOUT_MS``);
  Envoy treats any 5xx from the authorization server as an error and
  answers ``status_on_error``. A misconfigured route is a 500 for the same
  reason: the client sees 503, the authsvc log says what is wrong.
- ``GET /healthz`` is for Envoy's health check: 204 while the database is
  reachable, 503 otherwise. Never 200, the answer that would allow: a
  client path that reaches it (a config without ``path_prefix``) is denied.

A cache hit is answered synchronously (``Authorizer.check``): no task, no
suspension; answers are memoized per cached decision, like Check's
(``authsvc.memo``).

Admission: what waits (a cache miss, a key under a rate limit) takes a slot
of the process's ``Admission`` in ``Authorizer.complete``, the one bound Check and Authorize share
(``AUTHSVC_MAX_CONCURRENT_CALLS``). Without a free slot it is answered at
once with the answer of a store outage (503, the same body), never queued;
Envoy then applies ``status_on_error``. A cache hit never waits and needs
no slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from authsvc_client._http import Answer, rate_limit_headers

from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import Unavailable
from authsvc.core.keys import Decision
from authsvc.extauthz import Outcome, Question, RoutePolicy, log_misconfigured, settle
from authsvc.http_server import Request, Response
from authsvc.memo import ResponseMemo

REQUIRED_SCOPE_HEADER = "x-authsvc-required-scope"
PUBLIC_ROUTE_HEADER = "x-authsvc-public"
ROUTE_HEADERS = (REQUIRED_SCOPE_HEADER, PUBLIC_ROUTE_HEADER)
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
HEALTH_PATH = "/healthz"
_NO_ROUTE_SETTINGS: Mapping[str, str] = {}


def _response(answer: Answer, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(answer.status, (*answer.headers, *extra), answer.body)


def route_settings(headers: Mapping[str, str]) -> Mapping[str, str]:
    """The route headers in the form ``RoutePolicy`` reads Check's ``context_extensions``."""
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

    def __init__(self, authorizer: Authorizer, routes: RoutePolicy) -> None:
        self._authorizer = authorizer
        self._routes = routes
        http = routes.http
        self._allowed: ResponseMemo[tuple[str, ...], Response] = ResponseMemo(self._build_allowed)
        self._denied: ResponseMemo[None, Response] = ResponseMemo(self._build_denied)
        self._public: dict[tuple[str, ...], Response] = {}
        self._unavailable = _response(http.unavailable)
        self._misconfigured = _response(http.misconfigured)
        self._healthy = Response(204)
        self._unhealthy = _response(http.answer(503, "unavailable", "authsvc cannot reach its database"))
        #: Set by the App from the same database watch as gRPC health.
        self.serving = True

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        if request.path == HEALTH_PATH:
            return self._healthy if self.serving else self._unhealthy
        headers = request.headers
        question = self._routes.question(request.method, headers, route_settings(headers))
        if isinstance(question, Outcome):
            return self.respond(question)
        outcome = settle(self._authorizer, question, "envoy_http")
        if isinstance(outcome, Pending):
            return self._complete(question, outcome)
        return self.respond(outcome)

    async def _complete(self, question: Question, pending: Pending) -> Response:
        """A cache miss (or a rate-limited key): the one path that waits, on the database or Redis.

        The admission slot is taken when the task runs (``Authorizer.complete``,
        as for Authorize and Check): a task cancelled before it ever ran (its
        client gone) then holds none, and one cancelled while it waits gives it back.
        """
        try:
            decision = await self._authorizer.complete(pending)
        except Unavailable:  # at capacity, or the store cannot answer: the same 503
            return self._unavailable
        return self.respond(question.answered(decision))

    def respond(self, outcome: Outcome) -> Response:
        decision = outcome.decision
        if outcome.misconfigured is not None:
            log_misconfigured(outcome.misconfigured)
            return self._misconfigured
        if decision is None:
            return self._public_answer(outcome.strip)
        if not decision.allowed:
            return self._denied(decision, None)
        return self._allowed(decision, outcome.strip)

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

    def _build_allowed(self, decision: Decision, strip: tuple[str, ...]) -> Response:
        identity = self._routes.identity(decision)
        headers = [
            *identity.items(),
            # Set, not appended, by Envoy: a forged header of the same name is replaced.
            # The other forged ones and every key-bearing header are removed.
            self._removal(strip, keep=identity),
            *rate_limit_headers(decision),
        ]
        return Response(200, headers)

    def _build_denied(self, decision: Decision, _variant: None) -> Response:
        caller: tuple[tuple[str, str], ...] = ()
        if decision.principal is not None:  # for the access log (dynamic_metadata_from_headers)
            prefix = self._routes.identity_prefix
            caller = ((f"{prefix}org-id", decision.principal.org_id), (f"{prefix}key-id", decision.principal.key_id))
        return _response(self._routes.http.denial(decision), caller)
