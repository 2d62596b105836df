"""Where a request carries its API key, and the principal of the request being served.

Both integrations (the gRPC interceptors and the ASGI middleware) read keys
the same way as authsvc's Envoy adapter: ``x-api-key: <key>`` or
``authorization: ApiKey <key>``. A request carrying two *different* keys is
denied as malformed rather than choosing one, so no component in front of
the service can disagree with it about which key was checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextvars import ContextVar

from authsvc_client._decision import Decision, Principal, Reason

KEY_HEADER = "x-api-key"
AUTHORIZATION_SCHEME = "apikey"

# Logged text treats this many letters and digits in a row as (part of) a key:
# an authsvc key's secret part is 49 of them, while words, scope names and the
# transport's errors stay readable.
_KEY_LIKE = re.compile(r"[A-Za-z0-9]{16,}")
_REDACTED = "<redacted>"
_LOGGED_LENGTH = 200

_principal: ContextVar[Principal | None] = ContextVar("authsvc_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the request being handled, set by the interceptor or the middleware.

    ``None`` outside a protected request and on public methods or paths.
    """
    return _principal.get()


def _key_in(name: str, value: str) -> str | None:
    """The key this header (lowercase name) holds, or ``None`` when it holds none."""
    if name == KEY_HEADER:
        return value.strip()
    scheme, _, credentials = value.strip().partition(" ")
    if name == "authorization" and scheme.lower() == AUTHORIZATION_SCHEME:
        return credentials.strip()
    return None


def carries_key(name: str, value: str) -> bool:
    """Whether this header (lowercase name) holds an API key: such headers never reach the application."""
    return _key_in(name, value) is not None


def extract_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key from lowercase-named headers: ``""`` when there is none, ``None`` when two keys disagree."""
    found = {key for name, value in headers if (key := _key_in(name, value)) is not None}
    if len(found) > 1:
        return None
    return next(iter(found), "")


def loggable(message: str, key: str) -> str:
    """``message`` (authsvc's or the transport's) made safe for a log line.

    The client never relies on authsvc keeping keys out of its messages: the
    key of the request and anything shaped like a key are redacted, line breaks
    are flattened (no forged log lines) and the result is cut to 200 characters.
    """
    if key:
        message = message.replace(key, _REDACTED)
    message = " ".join(_KEY_LIKE.sub(_REDACTED, message).split())
    return message if len(message) <= _LOGGED_LENGTH else message[: _LOGGED_LENGTH - 1] + "…"


TWO_KEYS = Decision(
    allowed=False,
    reason=Reason.MALFORMED_KEY,
    http_status=401,
    message="the request carries two different API keys; send exactly one",
)
