"""Opaque page tokens for the audit trail, bound to the organization and filters they were issued for.

A token carries a position (the id below which the next page starts) and a
SHA-256 over the organization and the filters of the request that issued
it. A token presented with another organization (or other filters) does not
match its binding and is refused as INVALID_ARGUMENT, as is any token that
does not decode; so a token can never widen what a request reads. Altering
the position inside a token that still matches its binding only moves
within the caller's own organization's events, which it may read anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from datetime import datetime

from authsvc.core.errors import InvalidArgument

_VERSION = 1
_LAYOUT = struct.Struct(">BQ16s")


def _binding(org_id: str, filters: tuple[str | None, str | None, datetime | None, datetime | None]) -> bytes:
    text = "\x1f".join(
        [org_id, *("" if f is None else (f.isoformat() if isinstance(f, datetime) else f) for f in filters)]
    )
    return hashlib.sha256(b"authsvc.audit-page\x00" + text.encode()).digest()[:16]


def issue(position: int, org_id: str, filters: tuple[str | None, str | None, datetime | None, datetime | None]) -> str:
    raw = _LAYOUT.pack(_VERSION, position, _binding(org_id, filters))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read(token: str, org_id: str, filters: tuple[str | None, str | None, datetime | None, datetime | None]) -> int:
    """The position ``token`` names, if it was issued for this organization and these filters."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, position, binding = _LAYOUT.unpack(raw)
    except (binascii.Error, ValueError, struct.error):
        raise InvalidArgument(
            "page_token is not a token ListAuditEvents returned; omit it for the first page"
        ) from None
    if version != _VERSION or not hmac.compare_digest(binding, _binding(org_id, filters)):
        raise InvalidArgument(
            "page_token was issued for another organization or other filters; "
            "pass the same org_id and filters as the request that returned it"
        )
    return int(position)
