"""The key format: ``<prefix>_<random><checksum>``, and its SHA-256 digest.

* ``random`` is 43 base62 characters drawn with :mod:`secrets` (62**43 > 2**256,
  so at least 256 bits of entropy).
* ``checksum`` is the CRC32 of ``<prefix>_<random>`` in 6 base62 characters.
  It lets Authorize reject typos and garbage without touching the cache or
  the database, and lets secret scanners recognise real keys.
* Only ``sha256(key)`` is ever stored. SHA-256 without salt or stretching is
  right here: the input has 256 bits of entropy, so there is nothing to brute
  force, and the digest must be a cheap index for the hot path.
* The first 12 characters are the non-secret display prefix.

This module has no I/O.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH = 43
CHECKSUM_LENGTH = 6
DISPLAY_PREFIX_LENGTH = 12
assert CHECKSUM_LENGTH == 6  # is_well_formed decodes it as three pairs
# Longer than any key we issue; anything longer is rejected before hashing so
# a caller cannot make us hash megabytes.
MAX_KEY_LENGTH = 128
PREFIX_PATTERN = re.compile(r"[a-z][a-z0-9]{1,9}")

# Two characters at a time (3,844 entries): the checksum decodes in three
# lookups instead of a six-step loop, on every key that reaches a lookup.
_BASE62_PAIR = {a + b: i * 62 + j for i, a in enumerate(BASE62) for j, b in enumerate(BASE62)}


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(BASE62[digit])
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of ``body`` (``<prefix>_<random>``)."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def scan_pattern(prefixes: Iterable[str]) -> str:
    """Regex source that finds keys with any of ``prefixes`` inside arbitrary text.

    For secret scanners (``authsvc scan``, the gitleaks rule), which then
    check the checksum with :meth:`KeyFormat.is_well_formed`. Nothing is
    required on the left, so a key right after ``\\n`` or ``%3D`` in escaped
    text is still found, while a key of a longer prefix ending in this one
    (``xauthsvc_...``) fails: its checksum covers the longer text. On the right, a word character must not
    follow (the same as ``\\b``, also in Go's RE2): a key with one more
    character is not that key.
    """
    alternatives = "|".join(sorted({re.escape(p) for p in prefixes}, key=len, reverse=True))
    return rf"(?:{alternatives})_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}(?![0-9A-Za-z_])"


def digest(key: str) -> bytes:
    """SHA-256 of the full key: the only form in which a key is stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly generated key. ``secret`` is shown to the creator once, then dropped."""

    secret: str
    display_prefix: str
    digest: bytes

    def __repr__(self) -> str:
        # Never let a secret reach a log line through repr().
        return f"IssuedKey(display_prefix={self.display_prefix!r}, secret=<redacted>)"


@dataclass(frozen=True, slots=True)
class KeyFormat:
    """The deployment's key format; ``prefix`` is a short lowercase word such as ``authsvc``."""

    prefix: str
    _shape: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.fullmatch(self.prefix):
            raise ValueError(
                "key prefix must be 2-10 characters, a lowercase letter followed "
                f"by lowercase letters or digits, got {self.prefix!r}"
            )
        # One C-level match for the whole shape (hot path); ASCII only, so no Unicode digits slip in.
        shape = re.compile(rf"{self.prefix}_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}", re.ASCII)
        object.__setattr__(self, "_shape", shape)

    def generate(self) -> IssuedKey:
        body = f"{self.prefix}_" + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
        secret = body + checksum(body)
        return IssuedKey(secret=secret, display_prefix=secret[:DISPLAY_PREFIX_LENGTH], digest=digest(secret))

    def is_well_formed(self, key: str) -> bool:
        """True when ``key`` has this deployment's shape and a valid checksum.

        Cheap enough to run before any lookup: garbage never reaches the
        cache or the database.
        """
        if len(key) > MAX_KEY_LENGTH or not self._shape.fullmatch(key):
            return False
        # Decoding the 6 checksum characters is cheaper than encoding the CRC (hot path).
        pair = _BASE62_PAIR
        value = (pair[key[-6:-4]] * 3844 + pair[key[-4:-2]]) * 3844 + pair[key[-2:]]
        return value == zlib.crc32(key[:-CHECKSUM_LENGTH].encode("ascii"))

    def appears_in(self, text: str) -> bool:
        """True when ``text`` contains one of this deployment's keys (shape and checksum).

        Management calls refuse such text in their free-form fields: a key
        pasted into an org id or a name would otherwise be stored, audited
        and logged in the clear.
        """
        return any(self.is_well_formed(match.group()) for match in self._shape.finditer(text))
