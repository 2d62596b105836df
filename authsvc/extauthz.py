"""The Envoy ext_authz v3 adapter: ``envoy.service.auth.v3.Authorization/Check``.

A thin translation over the ``Authorizer`` (the same rules as
``authsvc.v1.KeyService/Authorize``, no second implementation). Reading the
key and rendering denials are the one HTTP policy's
(``authsvc_client._http``); what is Envoy's own is here (``RoutePolicy``):

1. Extract the key from the configured headers (``x-api-key: <key>``) or
   ``authorization: ApiKey <key>``. Two different keys: malformed. The same
   key twice (in both forms, or a repeated header) is just that key.
2. Resolve the required scope: the route's ``context_extensions["scope"]``,
   else the method rules (GET/HEAD/OPTIONS -> read, others -> write). A route
   with ``context_extensions["public"] = "true"`` needs no key.
3. Allowed: identity headers for the upstream (overwriting anything the client
   sent under the identity prefix), the key-bearing headers removed, and
   dynamic metadata for access logs and rate-limit filters. A public route
   gets no identity, but forged identity headers and keys are stripped too.
   Denied: the real HTTP status with a JSON body and, for 401, a
   ``WWW-Authenticate`` challenge; for 429, ``Retry-After`` and RateLimit headers.
   Envoy turns a non-OK CheckResponse *without* ``denied_response.status``
   into 403, so every denial sets it.
4. Store unreachable: ``Unavailable`` propagates as a gRPC error, so Envoy
   applies ``status_on_error`` (503 in the shipped config). Never an allow.
   A route naming a scope the catalog does not know, or an empty one, is a
   deployment bug: it answers 500 (never an allow) and the log says why.

Nothing here logs or echoes a key: bodies and headers are built from the
``Decision`` only. Responses are built once per cached principal or per
denial reason (``authsvc.memo``), not per request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from authsvc_client._decision import TWO_KEYS
from authsvc_client._http import Answer, HttpPolicy, rate_limit_headers
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import attribute_context_pb2 as attributes
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]  # googleapis-common-protos ships no stubs

from authsvc.config import Settings
from authsvc.core.authorizer import Authorizer, Pending
from authsvc.core.errors import InvalidArgument
from authsvc.core.keys import Decision, Principal
from authsvc.grpc.server import service_handler
from authsvc.memo import ResponseMemo

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = ext.DESCRIPTOR.services_by_name["Authorization"]
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Lower-case header name -> value, repeated headers joined by ",".
Headers = Mapping[str, str]


def request_headers(http: attributes.AttributeContext.HttpRequest) -> Headers:
    """The request headers by lower-case name, repeated ones joined by ``,``.

    Envoy sends ``headers`` in exactly that form (used as is: no copy on the
    hot path) or, with ``encode_raw_headers: true``, ``header_map`` (one entry
    per header line), which is folded into the same form.
    """
    if not http.header_map.headers:
        headers: Headers = http.headers  # a protobuf map: no copy
        return headers
    out: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        name = entry.key.lower()
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


class Outcome(NamedTuple):
    """One HTTP request's answer before any protocol: what both Envoy adapters translate.

    Immutable like the frozen dataclasses elsewhere, but a named tuple: one
    and a ``Question`` are built on every request, and a frozen dataclass
    costs three times as much to build.

    ``decision`` is None for a public route (allowed, no identity);
    ``misconfigured`` is the route's unusable scope ("" for none) when the
    route itself is wrong. ``strip``: headers the upstream must not see.
    """

    strip: tuple[str, ...]
    decision: Decision | None = None
    misconfigured: str | None = None


class Question(NamedTuple):
    """What the Authorizer must answer for a request whose route needs a key (a named tuple, like ``Outcome``)."""

    strip: tuple[str, ...]
    key: str
    scope: str

    def __repr__(self) -> str:
        return f"Question(strip={self.strip!r}, key=<redacted>, scope={self.scope!r})"

    def answered(self, decision: Decision) -> Outcome:
        return Outcome(self.strip, decision)

    def misconfigured(self) -> Outcome:
        """The Authorizer refused the scope (InvalidArgument): the route names one the catalog lacks."""
        return Outcome(self.strip, misconfigured=self.scope)


@dataclass(frozen=True)
class RoutePolicy:
    """What is Envoy's own, for both of its protocols: which scope a route needs, and the identity headers.

    Reading keys and rendering denials are the HTTP policy's (``http``).
    """

    http: HttpPolicy
    identity_prefix: str
    method_scopes: Mapping[str, str]
    default_scope: str

    @classmethod
    def from_settings(cls, settings: Settings) -> RoutePolicy:
        rules = {method.upper(): scope for method, scope in settings.method_scopes}
        return cls(
            http=settings.http_policy,
            identity_prefix=settings.identity_header_prefix.lower(),
            method_scopes={m: s for m, s in rules.items() if m != "*"},
            default_scope=rules.get("*", ""),
        )

    def question(self, method: str, headers: Headers, context: Mapping[str, str]) -> Outcome | Question:
        """The rules of an HTTP request up to Authorize, once for gRPC ``Check`` and the HTTP protocol alike.

        ``context`` is the route's settings (``scope``, ``public``): Check's
        ``context_extensions``, or the HTTP protocol's route headers. Either
        the outcome already, or the question for the Authorizer.
        """
        credentials = self.http.credentials(headers)
        strip = (*self.forged(headers), *credentials.carriers)
        if self.is_public(context):
            return Outcome(strip)
        if credentials.conflicting:
            return Outcome(strip, TWO_KEYS)
        scope = self.required_scope(method, context)
        if not scope:
            return Outcome(strip, misconfigured=scope)
        return Question(strip, credentials.key, scope)

    def forged(self, headers: Headers) -> list[str]:
        """Client-sent headers under the identity prefix: only authsvc may set those."""
        return [name for name in headers if name.startswith(self.identity_prefix)]

    def required_scope(self, method: str, context: Mapping[str, str]) -> str:
        """The route's own scope wins over the method rules.

        ``""`` (a route with an empty ``scope``, or method rules without a
        default) is a misconfiguration that ``Check`` refuses with a 500:
        through Envoy every protected route needs a scope, so a typo can
        never turn into "any valid key may do anything".
        """
        scope = context.get("scope")
        if scope is not None:
            return scope.strip()
        return self.method_scopes.get(method.upper(), self.default_scope)

    @staticmethod
    def is_public(context: Mapping[str, str]) -> bool:
        return context.get("public", "").strip().lower() == "true"

    def identity(self, decision: Decision) -> dict[str, str]:
        """The headers an allowed request carries to the upstream (names under the identity prefix).

        Labels go as ``<prefix>label-<name>``: label names are checked to be
        valid header names when they are set, and, being under the identity
        prefix, a client's forged ``label-*`` header is removed like any other.
        """
        principal = decision.principal
        assert principal is not None  # an allow always identifies the key
        prefix = self.identity_prefix
        headers = {
            f"{prefix}org-id": principal.org_id,
            f"{prefix}key-id": principal.key_id,
            f"{prefix}user-id": principal.user_id,
            f"{prefix}scopes": " ".join(principal.scopes),
        }
        for name, value in principal.labels:
            headers[f"{prefix}label-{name}"] = value
        return headers


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def metadata(principal: Principal) -> Struct:
    """Who called, for Envoy's access log and later filters (allowed or denied alike): never the key."""
    fields = Struct()
    fields.update(
        {
            "org_id": principal.org_id,
            "key_id": principal.key_id,
            "user_id": principal.user_id,
            "scopes": " ".join(principal.scopes),
        }
    )
    return fields


def denied_response(answer: Answer, principal: Principal | None = None) -> ext.CheckResponse:
    """Envoy's form of an HTTP policy answer (Envoy answers 403 to a denial without a status: it is always set).

    With ``principal`` (the key was identified: revoked, expired, scope, rate) it names the caller too.
    """
    return ext.CheckResponse(
        status=status_pb2.Status(code=int(answer.grpc_code), message=answer.message),
        denied_response=ext.DeniedHttpResponse(
            status=HttpStatus(code=answer.status),  # HTTP codes are the StatusCode enum's values
            headers=[_header(name, value) for name, value in answer.headers],
            body=answer.body.decode(),
        ),
        dynamic_metadata=metadata(principal) if principal is not None else None,
    )


def log_misconfigured(scope: str) -> None:
    """A route requires a scope the catalog lacks, or none: a deployment bug, loud in the operator's log.

    The client gets a generic message; the scope name and the catalog stay
    in the operator's log.
    """
    if scope:
        log.error("an Envoy route requires scope %r, which is not in the scope catalog (AUTHSVC_SCOPES_FILE)", scope)
    else:
        log.error(
            "an Envoy route requires no scope (an empty context_extensions scope, or a method without a rule "
            "in AUTHSVC_METHOD_SCOPES); name a scope, or mark the route public"
        )


def settle(authorizer: Authorizer, question: Question, transport: str) -> Outcome | Pending:
    """The outcome, when the Authorizer needs no I/O (a cache hit); else what ``Authorizer.complete`` must do.

    Both adapters answer a hit from here synchronously and await only a
    ``Pending`` (a cache miss or a rate limit), which raises ``Unavailable``
    when the key cannot be verified (fail closed).
    """
    try:
        decision = authorizer.check(question.key, question.scope, transport)
    except InvalidArgument:
        return question.misconfigured()
    return decision if isinstance(decision, Pending) else question.answered(decision)


class AuthorizationAdapter:
    """``Check``: one HTTP request's attributes in, Envoy's OK or Denied out."""

    def __init__(self, authorizer: Authorizer, routes: RoutePolicy) -> None:
        self._authorizer = authorizer
        self._routes = routes
        self._allowed: ResponseMemo[tuple[str, ...], ext.CheckResponse] = ResponseMemo(self._build_allowed)
        self._denied: ResponseMemo[None, ext.CheckResponse] = ResponseMemo(self._build_denied)
        self._misconfigured = denied_response(routes.http.misconfigured)

    async def Check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        http = request.attributes.request.http
        question = self._routes.question(http.method, request_headers(http), request.attributes.context_extensions)
        if isinstance(question, Outcome):
            return self.respond(question)
        outcome = settle(self._authorizer, question, "envoy_grpc")
        if isinstance(outcome, Pending):
            outcome = question.answered(await self._authorizer.complete(outcome))
        return self.respond(outcome)

    def respond(self, outcome: Outcome) -> ext.CheckResponse:
        decision = outcome.decision
        if outcome.misconfigured is not None:
            return self.misconfigured(outcome.misconfigured)
        if decision is None:  # a public route: no identity, but forged identity headers and keys go
            return ext.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=ext.OkHttpResponse(headers_to_remove=outcome.strip),
            )
        if not decision.allowed:
            return self.denied(decision)
        return self.allowed(decision, outcome.strip)

    def allowed(self, decision: Decision, strip: Sequence[str]) -> ext.CheckResponse:
        return self._allowed(decision, tuple(strip))

    def denied(self, decision: Decision) -> ext.CheckResponse:
        return self._denied(decision, None)

    def _build_allowed(self, decision: Decision, strip: tuple[str, ...]) -> ext.CheckResponse:
        principal = decision.principal
        assert principal is not None  # an allow always identifies the key
        identity = self._routes.identity(decision)
        return ext.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext.OkHttpResponse(
                # Set with overwrite: a forged header of the same name is replaced.
                headers=[_header(k, v) for k, v in identity.items()],
                # Other forged identity headers and every header that carried
                # a key: the upstream sees neither.
                headers_to_remove=[h for h in strip if h not in identity],
                response_headers_to_add=[_header(k, v) for k, v in rate_limit_headers(decision)],
            ),
            dynamic_metadata=metadata(principal),
        )

    def _build_denied(self, decision: Decision, _variant: None) -> ext.CheckResponse:
        return denied_response(self._routes.http.denial(decision), decision.principal)

    def misconfigured(self, scope: str) -> ext.CheckResponse:
        """A route requires a scope the catalog lacks, or none: never an allow, and the log says why."""
        log_misconfigured(scope)
        return self._misconfigured


def service(authorizer: Authorizer, routes: RoutePolicy) -> tuple[ServiceDescriptor, grpc.GenericRpcHandler]:
    """Check takes its admission slot in ``Authorizer.complete``, for what waits: never in the handler wrapper."""
    adapter = AuthorizationAdapter(authorizer, routes)
    return AUTHORIZATION_SERVICE, service_handler(AUTHORIZATION_SERVICE, adapter)
