"""The principal of the request being served, and log lines that can never hold a key.

Where a request carries its key is the HTTP policy's (``_http``).
"""

from __future__ import annotations

import re
from contextvars import ContextVar

from authsvc_client._decision import Principal

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
