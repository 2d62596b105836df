"""The Envoy ext_authz v3 adapter: ``envoy.service.auth.v3.Authorization/Check``.

A thin translation over ``KeyService.authorize`` (the same rules as
``authsvc.v1.KeyService/Authorize``):

1. Extract the key from the configured headers (``x-api-key: <key>``) or
   ``authorization: ApiKey <key>``. Two different keys: malformed.
2. Resolve the required scope: the route's ``context_extensions["scope"]``,
   else the method rules (GET/HEAD/OPTIONS -> read, others -> write). A route
   with ``context_extensions["public"] = "true"`` needs no key.
3. Allowed: identity headers for the upstream (overwriting anything the client
   sent under the identity prefix), the key-bearing header removed, and
   dynamic metadata for access logs and rate-limit filters.
   Denied: the real HTTP status with a JSON body and, for 401, a
   ``WWW-Authenticate`` challenge; for 429, ``Retry-After`` and RateLimit headers.
4. Store unreachable: ``Unavailable`` propagates as a gRPC error, so Envoy
   applies ``status_on_error`` (503 in the shipped config). Never an allow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from authsvc.config import Settings
from authsvc.grpc.server import service_handler
from authsvc.keys import Decision, Reason
from authsvc.service import KeyService

AUTHORIZATION_SERVICE = ext.DESCRIPTOR.services_by_name["Authorization"]
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc codes Envoy sees on a denial; the HTTP status is in denied_response.
_RPC_CODE = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 429: code_pb2.RESOURCE_EXHAUSTED}
_TWO_KEYS = object()


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
        rules = dict(settings.method_scopes)
        return cls(
            key_headers=settings.key_headers,
            authorization_scheme=settings.authorization_scheme.lower(),
            identity_prefix=settings.identity_header_prefix,
            method_scopes={m: s for m, s in rules.items() if m != "*"},
            default_scope=rules.get("*", ""),
        )

    def extract_key(self, headers: Mapping[str, str]) -> tuple[str, list[str]] | object:
        """The key and the headers that carried it, or ``_TWO_KEYS`` when they disagree."""
        found: list[str] = []
        carriers: list[str] = []
        for name in self.key_headers:
            value = headers.get(name)
            if value is not None:
                found.append(value.strip())
                carriers.append(name)
        if self.authorization_scheme:
            value = headers.get("authorization")
            if value is not None:
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == self.authorization_scheme:
                    found.append(credential.strip())
                    carriers.append("authorization")
        if len(set(found)) > 1:
            return _TWO_KEYS
        return (found[0] if found else ""), carriers

    def required_scope(self, method: str, context: Mapping[str, str]) -> str:
        scope = context.get("scope")
        if scope is not None:
            return scope
        return self.method_scopes.get(method.upper(), self.default_scope)


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def denied_body(reason: Reason, message: str) -> str:
    return json.dumps({"error": {"code": reason.name.lower(), "message": message}})


def rate_limit_headers(decision: Decision) -> list[HeaderValueOption]:
    rl = decision.rate_limit
    if rl is None:
        return []
    return [
        _header("ratelimit-limit", str(rl.limit)),
        _header("ratelimit-remaining", str(rl.remaining)),
        _header("ratelimit-reset", str(rl.reset_seconds)),
    ]


class AuthorizationAdapter:
    def __init__(self, service: KeyService, policy: HttpPolicy) -> None:
        self._service = service
        self._policy = policy

    async def Check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        http = request.attributes.request.http
        headers = http.headers
        context = request.attributes.context_extensions
        policy = self._policy
        forged = [name for name in headers if name.startswith(policy.identity_prefix)]
        extracted = policy.extract_key(headers)
        if context.get("public", "").lower() == "true":
            carriers = extracted[1] if isinstance(extracted, tuple) else list(policy.key_headers)
            return ext.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=ext.OkHttpResponse(headers_to_remove=forged + carriers),
            )
        if not isinstance(extracted, tuple):
            return self.denied(Decision(Reason.MALFORMED_KEY))
        key, carriers = extracted
        decision = await self._service.authorize(key, policy.required_scope(http.method, context))
        if not decision.allowed:
            return self.denied(decision)
        return self.allowed(decision, forged, carriers)

    def allowed(self, decision: Decision, forged: list[str], carriers: list[str]) -> ext.CheckResponse:
        principal = decision.principal
        assert principal is not None  # an allow always identifies the key
        prefix = self._policy.identity_prefix
        identity = {
            f"{prefix}org-id": principal.org_id,
            f"{prefix}key-id": principal.key_id,
            f"{prefix}user-id": principal.user_id,
            f"{prefix}scopes": " ".join(principal.scopes),
        }
        metadata = Struct()
        metadata.update({"org_id": principal.org_id, "key_id": principal.key_id, "scopes": " ".join(principal.scopes)})
        return ext.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext.OkHttpResponse(
                headers=[_header(k, v) for k, v in identity.items()],
                # Forged identity headers we do not overwrite, and every
                # header that carried the key: the upstream sees neither.
                headers_to_remove=[h for h in forged if h not in identity] + carriers,
                response_headers_to_add=rate_limit_headers(decision),
            ),
            dynamic_metadata=metadata,
        )

    @staticmethod
    def denied(decision: Decision) -> ext.CheckResponse:
        status = decision.http_status
        headers = [_header("content-type", "application/json")]
        if status == 401:
            headers.append(_header("www-authenticate", 'ApiKey realm="authsvc", header="x-api-key"'))
        if decision.rate_limit is not None:
            headers += rate_limit_headers(decision)
            if decision.reason is Reason.RATE_LIMITED:
                headers.append(_header("retry-after", str(decision.rate_limit.reset_seconds)))
        return ext.CheckResponse(
            status=status_pb2.Status(code=_RPC_CODE[status], message=decision.message),
            denied_response=ext.DeniedHttpResponse(
                status=HttpStatus(code=status),  # type: ignore[arg-type]  # HTTP codes are the enum's values
                headers=headers,
                body=denied_body(decision.reason, decision.message),
            ),
        )


def service(key_service: KeyService, settings: Settings) -> tuple[ServiceDescriptor, grpc.GenericRpcHandler]:
    adapter = AuthorizationAdapter(key_service, HttpPolicy.from_settings(settings))
    return AUTHORIZATION_SERVICE, service_handler(AUTHORIZATION_SERVICE, adapter)
