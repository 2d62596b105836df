"""The Envoy ext_authz v3 adapter: ``envoy.service.auth.v3.Authorization/Check``.

A thin translation over ``KeyService.authorize`` (the same rules as
``authsvc.v1.KeyService/Authorize``, no second implementation):

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
``Decision`` only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import attribute_context_pb2 as attributes
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]  # googleapis-common-protos ships no stubs

from authsvc.config import Settings
from authsvc.errors import InvalidArgument
from authsvc.grpc.server import service_handler
from authsvc.keys import Decision, Principal, Reason
from authsvc.memo import PrincipalMemo
from authsvc.service import KeyService

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = ext.DESCRIPTOR.services_by_name["Authorization"]
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc codes Envoy sees on a denial; the HTTP status is in denied_response.
RPC_CODE: Mapping[int, int] = {
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    500: code_pb2.INTERNAL,
}
MISCONFIGURED_ROUTE = "misconfigured_route"

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


def _parts(value: str) -> list[str]:
    # Keys never contain a comma, so splitting undoes Envoy's joining of repeated headers.
    return [part.strip() for part in value.split(",")]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request carried: its key ("" when none), the headers that carried one, and whether they disagreed."""

    key: str
    carriers: tuple[str, ...]
    conflicting: bool = False

    def __repr__(self) -> str:
        return f"Credentials(key=<redacted>, carriers={self.carriers!r}, conflicting={self.conflicting})"


@dataclass(frozen=True)
class HttpPolicy:
    """How HTTP requests map onto Authorize; built once from Settings."""

    key_headers: tuple[str, ...]
    authorization_scheme: str
    identity_prefix: str
    method_scopes: Mapping[str, str]
    default_scope: str

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpPolicy:
        rules = {method.upper(): scope for method, scope in settings.method_scopes}
        return cls(
            key_headers=tuple(h.lower() for h in settings.key_headers),
            authorization_scheme=settings.authorization_scheme.lower(),
            identity_prefix=settings.identity_header_prefix.lower(),
            method_scopes={m: s for m, s in rules.items() if m != "*"},
            default_scope=rules.get("*", ""),
        )

    def credentials(self, headers: Headers) -> Credentials:
        """The key from every header that may carry one (repeated headers joined by ``,``).

        A header that carries a key is listed in ``carriers`` (so it is
        stripped before the upstream) even when it turns out empty or wrong.
        """
        found: set[str] = set()
        carriers: list[str] = []
        for name in self.key_headers:
            if name in headers:
                carriers.append(name)
                found.update(part for part in _parts(headers[name]) if part)
        if self.authorization_scheme and "authorization" in headers:
            for part in _parts(headers["authorization"]):
                scheme, _, credential = part.partition(" ")
                if scheme.lower() == self.authorization_scheme:
                    if "authorization" not in carriers:
                        carriers.append("authorization")
                    if credential.strip():
                        found.add(credential.strip())
        if len(found) > 1:
            return Credentials("", tuple(carriers), conflicting=True)
        return Credentials(next(iter(found), ""), tuple(carriers))

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

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of every 401: tells a client how to send its key."""
        if self.key_headers:
            return f'ApiKey realm="authsvc", header="{self.key_headers[0]}"'
        return 'ApiKey realm="authsvc"'


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def rate_limit_headers(decision: Decision) -> list[HeaderValueOption]:
    rl = decision.rate_limit
    if rl is None:
        return []
    return [
        _header("ratelimit-limit", str(rl.limit)),
        _header("ratelimit-remaining", str(rl.remaining)),
        _header("ratelimit-reset", str(rl.reset_seconds)),
    ]


def _deny(status: int, code: str, message: str, headers: list[HeaderValueOption]) -> ext.CheckResponse:
    return ext.CheckResponse(
        status=status_pb2.Status(code=RPC_CODE[status], message=message),
        denied_response=ext.DeniedHttpResponse(
            status=HttpStatus(code=status),  # HTTP codes are the StatusCode enum's values
            headers=[_header("content-type", "application/json"), *headers],
            body=error_body(code, message),
        ),
    )


class AuthorizationAdapter:
    """``Check``: one HTTP request's attributes in, Envoy's OK or Denied out."""

    def __init__(self, service: KeyService, policy: HttpPolicy) -> None:
        self._service = service
        self._policy = policy
        self._allowed: PrincipalMemo[tuple[str, tuple[str, ...]], ext.CheckResponse] = PrincipalMemo()

    async def Check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        http = request.attributes.request.http
        context = request.attributes.context_extensions
        policy = self._policy
        headers = request_headers(http)
        credentials = policy.credentials(headers)
        strip = (*policy.forged(headers), *credentials.carriers)
        if policy.is_public(context):
            return ext.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK), ok_response=ext.OkHttpResponse(headers_to_remove=strip)
            )
        if credentials.conflicting:
            return self.denied(Decision(Reason.MALFORMED_KEY))
        scope = policy.required_scope(http.method, context)
        if not scope:
            return self.misconfigured(scope)
        try:
            decision = await self._service.authorize(credentials.key, scope, "envoy_grpc")
        except InvalidArgument:
            return self.misconfigured(scope)
        if not decision.allowed:
            return self.denied(decision)
        return self.allowed(decision, strip)

    def allowed(self, decision: Decision, strip: Sequence[str]) -> ext.CheckResponse:
        strip = tuple(strip)
        principal = decision.principal
        assert principal is not None  # an allow always identifies the key
        if decision.rate_limit is not None:  # counters differ on every call
            return self._build_allowed(decision, principal, strip)
        return self._allowed.get_or_build(
            (principal.key_id, strip), principal, lambda: self._build_allowed(decision, principal, strip)
        )

    def _build_allowed(self, decision: Decision, principal: Principal, strip: Sequence[str]) -> ext.CheckResponse:
        prefix = self._policy.identity_prefix
        scopes = " ".join(principal.scopes)
        identity = {
            f"{prefix}org-id": principal.org_id,
            f"{prefix}key-id": principal.key_id,
            f"{prefix}user-id": principal.user_id,
            f"{prefix}scopes": scopes,
        }
        metadata = Struct()
        metadata.update(
            {"org_id": principal.org_id, "key_id": principal.key_id, "user_id": principal.user_id, "scopes": scopes}
        )
        return ext.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext.OkHttpResponse(
                # Set with overwrite: a forged header of the same name is replaced.
                headers=[_header(k, v) for k, v in identity.items()],
                # Other forged identity headers and every header that carried
                # a key: the upstream sees neither.
                headers_to_remove=[h for h in strip if h not in identity],
                response_headers_to_add=rate_limit_headers(decision),
            ),
            dynamic_metadata=metadata,
        )

    def denied(self, decision: Decision) -> ext.CheckResponse:
        status = decision.http_status
        headers: list[HeaderValueOption] = []
        if status == 401:
            headers.append(_header("www-authenticate", self._policy.challenge()))
        headers += rate_limit_headers(decision)
        if status == 429:
            # Every 429 says when to retry, even if the limiter gave no window.
            reset = decision.rate_limit.reset_seconds if decision.rate_limit is not None else 1
            headers.append(_header("retry-after", str(reset)))
        return _deny(status, decision.reason.code, decision.message, headers)

    @staticmethod
    def misconfigured(scope: str) -> ext.CheckResponse:
        """A route requires a scope the catalog lacks, or none: a deployment bug, loud in the log, never an allow.

        The client gets a generic message; the scope name and the catalog stay
        in the operator's log.
        """
        if scope:
            log.error(
                "an Envoy route requires scope %r, which is not in the scope catalog (AUTHSVC_SCOPES_FILE)", scope
            )
        else:
            log.error(
                "an Envoy route requires no scope (an empty context_extensions scope, or a method without a rule "
                "in AUTHSVC_METHOD_SCOPES); name a scope, or mark the route public"
            )
        return _deny(500, MISCONFIGURED_ROUTE, "this route is misconfigured; the authsvc log says why", [])


def service(key_service: KeyService, settings: Settings) -> tuple[ServiceDescriptor, grpc.GenericRpcHandler]:
    adapter = AuthorizationAdapter(key_service, HttpPolicy.from_settings(settings))
    return AUTHORIZATION_SERVICE, service_handler(AUTHORIZATION_SERVICE, adapter)
