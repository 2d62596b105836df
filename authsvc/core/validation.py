"""Input checks for management calls: each failure names the field and how to fix it.

Everything is checked before anything is written, so a bad request never
leaves partial data behind.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from authsvc.core.errors import InvalidArgument
from authsvc.core.keys import KeyState, Role, ScopeCatalog

MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 100
MAX_REASON_LENGTH = 500
MAX_SCOPES_IN_REQUEST = 64
MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_PAGE = 1_000_000
MAX_LABELS = 16
MAX_LABEL_VALUE_LENGTH = 256
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}", re.ASCII)
#: The fields UpdateKey may change; everything else about a key is fixed (rotate instead).
UPDATABLE_FIELDS = ("name", "labels")
_ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
# The canonical 8-4-4-4-12 form only: uuid.UUID() also takes braces, "urn:uuid:",
# no dashes, stray underscores and non-ASCII digits, which would make two
# spellings of one id (or a mistyped id silently naming another key).
# Upper-case hex digits match here so that the caller is told the one fix
# (lower-case) rather than that the id is no id at all.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
# Control, format, private-use, unassigned and surrogate characters, and the
# Unicode line and paragraph separators: all of them break log lines and
# dashboards, or hide what a name really says.
_UNPRINTABLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
# The driver's stand-ins for -infinity and infinity: only the instants strictly
# between them can be stored and read back unchanged.
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
TIMESTAMP_RANGE = "must be after 0001-01-01T00:00:00Z and before 9999-12-31T23:59:59.999999Z"


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in _UNPRINTABLE for ch in text)


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
    if not _UUID.fullmatch(value):
        raise InvalidArgument(
            "key_id must be a key id as returned by CreateKey: a UUID in its 36-character form, "
            "e.g. 3f2c8a1e-5b7d-4e0a-9c61-2d8f4b7a9e13"
        )
    if value != value.lower():
        raise InvalidArgument(
            f"key_id must be in the lower-case canonical form returned by CreateKey: use {value.lower()}"
        )
    return value


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


def free_text(field: str, value: str, max_length: int, *, example: str = "") -> str:
    """Short free text stored in reasons and logs: trimmed, bounded, no control characters; ``example``: required."""
    trimmed = value.strip()
    if example and not trimmed:
        raise InvalidArgument(f"{field} is required, e.g. {example}")
    if len(trimmed) > max_length:
        raise InvalidArgument(f"{field} must be at most {max_length} characters, got {len(trimmed)}")
    if _has_control(trimmed):
        raise InvalidArgument(f"{field} must not contain control characters (newlines, tabs, escapes)")
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


def timestamp(value: datetime, field: str) -> datetime:
    """Refuse an instant that would not read back as itself.

    asyncpg writes ``datetime.max`` and ``datetime.min`` as PostgreSQL's
    ``infinity`` and ``-infinity``, and reads those back as *naive*
    datetimes that no aware instant compares with: one such ``expire_time``
    made every ListKeys and GetKey of its organization fail. The schema
    refuses infinite timestamps too (migration 0007). Everything strictly
    between them is stored exactly, to the microsecond.
    """
    if value.tzinfo is None:
        raise InvalidArgument(f"{field} must carry a time zone")
    if not _EARLIEST < value < _LATEST:
        raise InvalidArgument(f"{field} {TIMESTAMP_RANGE}")
    return value


def expire_time(value: datetime | None, now: datetime) -> datetime | None:
    if value is not None:
        timestamp(value, "expire_time")
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


def labels(values: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Labels as sorted ``(name, value)`` pairs.

    Names become HTTP header names (``x-authsvc-label-<name>``), hence the
    strict shape; values become header values, hence no control characters.
    """
    if len(values) > MAX_LABELS:
        raise InvalidArgument(f"labels: at most {MAX_LABELS} per key, got {len(values)}")
    for key, value in values.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"labels: name {describe_label(key)} must be 1-63 characters of a-z, 0-9, _ . -, "
                "starting with a letter, e.g. 'tier'"
            )
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            raise InvalidArgument(
                f"labels[{key}]: value must be at most {MAX_LABEL_VALUE_LENGTH} characters, got {len(value)}"
            )
        if _has_control(value):
            raise InvalidArgument(f"labels[{key}]: value must not contain control characters (newlines, tabs, escapes)")
    return tuple(sorted(values.items()))


def describe_label(name: str) -> str:
    """A refused label name for an error message: quoted only when short and printable (it may be a pasted key)."""
    if len(name) <= 63 and name.isascii() and name.isprintable() and not re.search(r"[A-Za-z0-9]{16,}", name):
        return repr(name)
    return f"(a value of {len(name)} characters)"


def grace_period(value: timedelta, maximum: timedelta) -> timedelta:
    if value < timedelta(0):
        raise InvalidArgument("grace_period must not be negative; 0 (or unset) ends the old key at once")
    if value > maximum:
        raise InvalidArgument(
            f"grace_period must be at most {int(maximum.total_seconds())}s (AUTHSVC_MAX_ROTATION_GRACE), "
            f"got {int(value.total_seconds())}s"
        )
    return value


def created_by(value: str) -> str:
    if not value or not value.strip():
        raise InvalidArgument("created_by is required: the user id whose keys are to be revoked")
    if len(value) > MAX_ID_LENGTH or _has_control(value) or value != value.strip():
        raise InvalidArgument(
            f"created_by must be at most {MAX_ID_LENGTH} characters, without control characters or surrounding spaces"
        )
    return value


def update_mask(paths: Sequence[str]) -> frozenset[str]:
    if not paths:
        raise InvalidArgument(f"update_mask must name the fields to change: {' and/or '.join(UPDATABLE_FIELDS)}")
    for path in paths:
        if path not in UPDATABLE_FIELDS:
            shown = repr(path) if len(path) <= 40 and path.isprintable() else f"(a path of {len(path)} characters)"
            raise InvalidArgument(
                f"update_mask: {shown} cannot be changed; only {' and '.join(UPDATABLE_FIELDS)} can "
                "(scopes, expiry and the rate limit are fixed: rotate or create a new key)"
            )
    return frozenset(paths)
