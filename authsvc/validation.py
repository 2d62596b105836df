"""Input checks for management calls: each failure names the field and how to fix it.

Everything is checked before anything is written, so a bad request never
leaves partial data behind.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Sequence
from datetime import datetime

from authsvc.errors import InvalidArgument
from authsvc.keys import KeyState, Role, ScopeCatalog

MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 100
MAX_REASON_LENGTH = 500
MAX_SCOPES_IN_REQUEST = 64
MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_PAGE = 1_000_000
_ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


def org_id(value: str) -> str:
    if not value:
        raise InvalidArgument("org_id is required")
    if len(value) > MAX_ID_LENGTH or not _ORG_ID.fullmatch(value):
        raise InvalidArgument(
            f"org_id must be 1-{MAX_ID_LENGTH} characters of letters, digits and . _ : @ -, "
            "starting with a letter or digit"
        )
    return value


def actor_user_id(value: str) -> str:
    if not value or not value.strip():
        raise InvalidArgument("actor.user_id is required")
    if len(value) > MAX_ID_LENGTH or _has_control(value) or value != value.strip():
        raise InvalidArgument(
            f"actor.user_id must be at most {MAX_ID_LENGTH} characters, "
            "without control characters or surrounding spaces"
        )
    return value


def role(value: int) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(f"actor.role {value} is not a known role") from None


def key_id(value: str) -> str:
    if not value:
        raise InvalidArgument("key_id is required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument("key_id must be a key id as returned by CreateKey (a UUID)") from None


def name(value: str) -> str:
    trimmed = value.strip()
    if not trimmed:
        raise InvalidArgument("name is required: say what the key is for, e.g. 'ci-pipeline'")
    if len(trimmed) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"name must be at most {MAX_NAME_LENGTH} characters, got {len(trimmed)}")
    if _has_control(trimmed):
        raise InvalidArgument("name must not contain control characters (newlines, tabs, escapes)")
    return trimmed


def reason(value: str) -> str:
    trimmed = value.strip()
    if len(trimmed) > MAX_REASON_LENGTH:
        raise InvalidArgument(f"reason must be at most {MAX_REASON_LENGTH} characters, got {len(trimmed)}")
    if _has_control(trimmed):
        raise InvalidArgument("reason must not contain control characters (newlines, tabs, escapes)")
    return trimmed


def scopes(values: Sequence[str], catalog: ScopeCatalog) -> tuple[str, ...]:
    if not values:
        raise InvalidArgument(
            f"scopes: at least one scope is required; known scopes: {', '.join(sorted(catalog.scopes))}"
        )
    if len(values) > MAX_SCOPES_IN_REQUEST:
        raise InvalidArgument(f"scopes: at most {MAX_SCOPES_IN_REQUEST} entries, got {len(values)}")
    unique: list[str] = []
    for scope in values:
        if scope not in catalog:
            raise InvalidArgument(f"scopes: unknown scope {catalog.unknown(scope)}")
        if scope not in unique:
            unique.append(scope)
    return tuple(sorted(unique))


def expire_time(value: datetime | None, now: datetime) -> datetime | None:
    if value is not None and value <= now:
        raise InvalidArgument("expire_time must be in the future; leave it unset for a key that never expires")
    return value


def page_and_limit(page: int, limit: int) -> tuple[int, int]:
    if page < 0 or page > MAX_PAGE:
        raise InvalidArgument(f"page must be between 1 and {MAX_PAGE} (0 means 1), got {page}")
    if limit < 0 or limit > MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT} (0 means {DEFAULT_LIMIT}), got {limit}")
    return page or 1, limit or DEFAULT_LIMIT


def state(value: int | None) -> KeyState | None:
    if value is None or value == KeyState.UNSPECIFIED:
        return None
    try:
        return KeyState(value)
    except ValueError:
        raise InvalidArgument(f"state {value} is not a known key state") from None


def rate_limit(value: int) -> int:
    if value < 0 or value > 1_000_000_000:
        raise InvalidArgument("rate_limit must be between 0 (the deployment default) and 1000000000")
    return value
