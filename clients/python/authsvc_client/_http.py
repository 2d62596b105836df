"""The one HTTP policy: where a request carries its key, and how a denial looks.

Every front end that turns an authorization decision into an HTTP or gRPC
answer uses this module and nothing else: authsvc's Envoy adapters (gRPC
``Check`` and the HTTP ext_authz server), this package's ASGI middleware and
its gRPC interceptors. So a 401 has the same status, code, headers and body
wherever it is produced, and a key is read the same way everywhere:

* ``x-api-key: <key>`` (the configured key headers) or
  ``authorization: ApiKey <key>`` (the configured scheme);
* the same key twice (both forms, or a repeated header) is that key;
  two *different* keys are malformed: no component in front of a service
  can then disagree with it about which key was checked;
* every header that carried a key is named in ``Credentials.carriers`` so
  that it is stripped before the request goes on (an upstream never sees a
  secret), even when the key in it was empty or wrong.

Denials are rendered once per reason (``Answer``); only a rate-limited
answer, whose counters change on every call, is built per request.

The table from a reason to its HTTP status lives with the reason
(``_decision``); this module maps HTTP statuses on to gRPC codes.

No I/O and no grpc import here: authsvc's core and its HTTP server import it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from authsvc_client._decision import TWO_KEYS, Decision, Reason

KEY_HEADER = "x-api-key"
AUTHORIZATION_SCHEME = "ApiKey"

#: Lower-case header name -> value, repeated headers joined by ``","``
#: (how Envoy sends them, and how ``joined`` folds header pairs).
Headers = Mapping[str, str]


class GrpcCode(enum.IntEnum):
    """The gRPC status codes an answer maps to (numbers as in ``google.rpc.Code``).

    Plain integers so this module needs no grpc import; ``grpc.StatusCode``
    and Envoy's ``google.rpc.Status`` both take them.
    """

    OK = 0
    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


#: HTTP status -> gRPC code: the second half of the Reason -> HTTP -> gRPC table.
GRPC_CODE: Mapping[int, GrpcCode] = {
    200: GrpcCode.OK,
    400: GrpcCode.INVALID_ARGUMENT,
    401: GrpcCode.UNAUTHENTICATED,
    403: GrpcCode.PERMISSION_DENIED,
    429: GrpcCode.RESOURCE_EXHAUSTED,
    500: GrpcCode.INTERNAL,
    503: GrpcCode.UNAVAILABLE,
}


def grpc_code(http_status: int) -> GrpcCode:
    """Any status the table does not name is a denial (PERMISSION_DENIED), never OK."""
    return GRPC_CODE.get(http_status, GrpcCode.PERMISSION_DENIED)


def joined(pairs: object) -> dict[str, str]:
    """Header pairs ``(name, value)`` as ``Headers``: lower-case names, repeats joined by ``","``.

    Values that are not text (gRPC ``-bin`` metadata) can never carry a key
    and are left out.
    """
    out: dict[str, str] = {}
    for name, value in pairs:  # type: ignore[attr-defined]  # any iterable of pairs
        if isinstance(value, bytes):
            continue
        name = str(name).lower()
        out[name] = f"{out[name]},{value}" if name in out else str(value)
    return out


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every denial: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request carried: its key ("" when none), the headers that carried one, and whether they disagreed."""

    key: str
    carriers: tuple[str, ...]
    conflicting: bool = False

    def __repr__(self) -> str:
        return f"Credentials(key=<redacted>, carriers={self.carriers!r}, conflicting={self.conflicting})"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: status, headers (lower-case names, bytes) and body. Immutable, so shared freely."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def grpc_code(self) -> GrpcCode:
        return grpc_code(self.status)

    @property
    def retry_after(self) -> str | None:
        return next((v for k, v in self.headers if k == "retry-after"), None)


_NO_KEY = Credentials("", ())


def _parts(value: str) -> list[str]:
    # Keys never contain a comma, so splitting undoes the joining of repeated headers.
    return [part.strip() for part in value.split(",")]


class HttpPolicy:
    """Key extraction and denial rendering, built once from the deployment's settings."""

    def __init__(
        self, key_headers: tuple[str, ...] = (KEY_HEADER,), authorization_scheme: str = AUTHORIZATION_SCHEME
    ) -> None:
        self.key_headers = tuple(h.lower() for h in key_headers)
        self.authorization_scheme = authorization_scheme.lower()
        header = f', header="{self.key_headers[0]}"' if self.key_headers else ""
        #: The ``WWW-Authenticate`` value of every 401: tells a client how to send its key.
        self.challenge = f'ApiKey realm="authsvc"{header}'
        self._denials: dict[Reason, Answer] = {r: self._render(Decision(r)) for r in Reason if r is not Reason.OK}
        self._two_keys = self._render(TWO_KEYS)
        self.unavailable = self.answer(
            503, "unavailable", "the authorization service is unavailable; retry later", (("retry-after", "1"),)
        )
        self.misconfigured = self.answer(
            500, "misconfigured_route", "this route is misconfigured; the authsvc log says why"
        )
        self.no_rule = self.answer(403, "forbidden", "no authorization rule covers this route")
        self.failed = self.answer(500, "internal_error", "authorization failed; the server log has details")

    # -- reading keys -------------------------------------------------------

    def credentials(self, headers: Headers) -> Credentials:
        """The key from every header that may carry one (see the module docstring)."""
        scheme = self.authorization_scheme
        authorization = headers.get("authorization") if scheme else None
        if authorization is None and len(self.key_headers) == 1:
            # The common case, on every request through Envoy: at most one
            # header to read. Same answer as below, without its set and list.
            name = self.key_headers[0]
            value = headers.get(name)
            if value is None:
                return _NO_KEY
            if "," not in value:
                return Credentials(value.strip(), (name,))
        found: set[str] = set()
        carriers: list[str] = []
        for name in self.key_headers:
            value = headers.get(name)
            if value is not None:
                carriers.append(name)
                found.update(part for part in _parts(value) if part)
        if authorization is not None:
            for part in _parts(authorization):
                given, _, credential = part.partition(" ")
                if given.lower() == scheme:
                    if "authorization" not in carriers:
                        carriers.append("authorization")
                    if credential.strip():
                        found.add(credential.strip())
        if len(found) > 1:
            return Credentials("", tuple(carriers), conflicting=True)
        return Credentials(next(iter(found), ""), tuple(carriers))

    def carries_key(self, name: str, value: str) -> bool:
        """Whether one header line (lower-case name) is one the policy reads keys from."""
        if name in self.key_headers:
            return True
        return (
            name == "authorization"
            and bool(self.authorization_scheme)
            and any(p.partition(" ")[0].lower() == self.authorization_scheme for p in _parts(value))
        )

    # -- rendering answers --------------------------------------------------

    @staticmethod
    def answer(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        return Answer(
            status, code, message, (("content-type", "application/json"), *headers), error_body(code, message)
        )

    def denial(self, decision: Decision) -> Answer:
        """The answer for a denied decision: built once per reason, except for rate-limit counters."""
        if decision.rate_limit is None and decision.reason is not Reason.RATE_LIMITED:
            if decision is TWO_KEYS:
                return self._two_keys
            cached = self._denials.get(decision.reason)
            if cached is not None and cached.status == decision.http_status:
                return cached
        return self._render(decision)

    def _render(self, decision: Decision) -> Answer:
        status = decision.http_status if decision.http_status >= 400 else 403
        headers: list[tuple[str, str]] = []
        if status == 401:
            headers.append(("www-authenticate", self.challenge))
        headers += rate_limit_headers(decision)
        if status == 429:
            # Every 429 says when to retry, even if the limiter gave no window.
            headers.append(("retry-after", str(decision.retry_after)))
        return self.answer(status, decision.reason.code, decision.message, tuple(headers))


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """``RateLimit-*`` headers (draft IETF names) for a decision a limit applies to."""
    rl = decision.rate_limit
    if rl is None:
        return []
    return [
        ("ratelimit-limit", str(rl.limit)),
        ("ratelimit-remaining", str(rl.remaining)),
        ("ratelimit-reset", str(rl.reset_seconds)),
    ]
