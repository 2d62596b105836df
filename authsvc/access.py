"""Who may manage keys: named admin tokens and admin client-certificate names, parsed once at start-up.

Forms (see README, "Running it in production"):

* ``AUTHSVC_ADMIN_TOKENS=name:token,name2:token2:org1|org2``
* ``AUTHSVC_ADMIN_TOKENS_FILE``: one ``name:token[:org1|org2]`` per line;
  blank lines and lines starting with ``#`` are skipped. The file must not
  be readable by "other" (``chmod 600`` or ``640``), as with SSH keys.
* ``AUTHSVC_ADMIN_CLIENT_NAMES=name,name2=org1|org2``: client-certificate
  identities (SAN DNS or URI, else CN). ``=`` rather than ``:`` separates the
  organizations because URI identities (``spiffe://...``) contain colons.

A token without a name (today's bare form) is refused with a message giving
the new form: guessing where a name ends in ``a:b`` could turn part of a
secret into a name, and names are written to the audit trail and logs.
No message here ever contains a token: entries are named by their name or
their position.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from authsvc.core import validation
from authsvc.core.errors import ConfigError, InvalidArgument

#: Caller names end up in audit rows and log lines: short, printable, no separators.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: A certificate identity: a DNS name, a URI (SPIFFE id) or a CN, without spaces or our separators.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][!-~]{0,254}")
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class AdminToken:
    """One configured admin token: its name (the audit caller), the secret, and its organizations."""

    name: str
    token: str = field(repr=False)
    orgs: frozenset[str] | None = None
    """``None``: any organization."""


@dataclass(frozen=True)
class AdminClient:
    """A client-certificate identity that may manage keys like an admin token, optionally org-bound."""

    name: str
    orgs: frozenset[str] | None = None


def _orgs(raw: str, where: str) -> frozenset[str]:
    orgs = [part.strip() for part in raw.split("|")]
    if not any(orgs):
        raise ConfigError(f"{where}: the organization list after the last separator is empty; drop it or name orgs")
    for org in orgs:
        try:
            validation.org_id(org)
        except InvalidArgument as exc:
            raise ConfigError(f"{where}: organization {org!r}: {exc}") from None
    return frozenset(orgs)


def parse_token(entry: str, where: str) -> AdminToken:
    """``name:token[:org1|org2]``; ``where`` says which variable and entry, for the message."""
    name, sep, rest = entry.partition(":")
    if not sep:
        raise ConfigError(
            f"{where} has no name: write name:token (or name:token:org1|org2); the name is recorded as the caller"
        )
    token, sep, orgs = rest.partition(":")
    name, token = name.strip(), token.strip()
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: the name must be 1-64 letters, digits or . _ @ -, starting with a letter or digit")
    where = f"{where} ({name})"
    if len(token) < MIN_TOKEN_LENGTH or any(ch.isspace() or ch == "," for ch in token):
        raise ConfigError(
            f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters without spaces or commas, "
            "e.g. from `openssl rand -hex 32`"
        )
    return AdminToken(name, token, _orgs(orgs, where) if sep else None)


def parse_tokens(raw: str | None, file: Path | None) -> tuple[AdminToken, ...]:
    tokens: list[AdminToken] = []
    if raw is not None:
        entries = [e for e in raw.split(",") if e.strip()]
        tokens += [parse_token(e, f"AUTHSVC_ADMIN_TOKENS entry {i}") for i, e in enumerate(entries, 1)]
    if file is not None:
        tokens += [parse_token(line, f"AUTHSVC_ADMIN_TOKENS_FILE line {n}") for n, line in _token_lines(file)]
    _unique((t.name for t in tokens), "AUTHSVC_ADMIN_TOKENS(_FILE): the name {} is used twice; names must be unique")
    if len({t.token for t in tokens}) != len(tokens):
        raise ConfigError("AUTHSVC_ADMIN_TOKENS(_FILE): two names share one token; give each its own")
    return tuple(tokens)


def _token_lines(file: Path) -> list[tuple[int, str]]:
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"AUTHSVC_ADMIN_TOKENS_FILE: cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"AUTHSVC_ADMIN_TOKENS_FILE: {file} is not UTF-8 text") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"AUTHSVC_ADMIN_TOKENS_FILE: {file} is readable or writable by other users; chmod 600 (or 640) it"
        )
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def parse_clients(raw: str | None) -> tuple[AdminClient, ...]:
    clients: list[AdminClient] = []
    for i, entry in enumerate((e.strip() for e in (raw or "").split(",") if e.strip()), 1):
        name, sep, orgs = entry.partition("=")
        name = name.strip()
        where = f"AUTHSVC_ADMIN_CLIENT_NAMES entry {i}"
        if not _CLIENT_NAME.fullmatch(name) or "|" in name:
            raise ConfigError(
                f"{where}: {name!r} must be a certificate's DNS name, URI or CN, optionally name=org1|org2"
            )
        clients.append(AdminClient(name, _orgs(orgs, f"{where} ({name})") if sep else None))
    _unique((c.name for c in clients), "AUTHSVC_ADMIN_CLIENT_NAMES: {} is listed twice")
    return tuple(clients)


def _unique(names: Iterable[str], message: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(message.format(name))
        seen.add(name)
