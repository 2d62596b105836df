"""Which PostgreSQL server a connection reached, and whether it is the writable primary.

With a multi-host URL (``postgresql://…@h1:5432,h2:5432/db``) a connection
may land on any listed server. authsvc writes keys and trusts its cache only
because it hears every change of the server its listener follows, so:

* every connection (pool and listener) asks for a writable primary
  (``target_session_attrs=read-write``), ``identify`` refuses a server in
  recovery whatever the driver decided, and the heartbeat and the health
  ping ask ``NOT_WRITABLE`` again (a server may turn read-only under us);
* every connection learns its server's identity once, at set-up, so the
  cache can refuse rows read from a server other than its feed's with one
  identity compare (``is``: identities are interned) and no query per lookup.

The identity is the system identifier (shared by a primary and the standbys
cloned from it), the timeline (a promoted standby starts a new one) and the
postmaster's start time (a restart is another lifetime, with notifications
lost in between; two clones never share it to the microsecond). Not the
address: one server reached by two names or paths is still one server, and
a mismatch there would only make the cache store nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import asyncpg

from authsvc.config import database_session_attrs


class NotPrimary(Exception):
    """The server is in recovery (a standby): no writes, and no notifications of writes."""


class ServerIdentity(NamedTuple):
    system_identifier: int
    timeline: int
    started: str


# pg_walfile_name and pg_current_wal_lsn fail during recovery, hence the CASE
# (both are volatile, so the planner cannot evaluate them early).
_IDENTIFY = """
SELECT pg_is_in_recovery() AS recovery,
       (SELECT system_identifier FROM pg_control_system()) AS system_identifier,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline,
       pg_postmaster_start_time()::text AS started
"""
_known: dict[ServerIdentity, ServerIdentity] = {}
# True on a standby (in recovery, transactions are read-only) and on a primary
# switched to default_transaction_read_only: either way, not the primary we need.
NOT_WRITABLE = "SELECT current_setting('transaction_read_only') = 'on' OR pg_is_in_recovery()"


async def identify(connection: asyncpg.Connection) -> ServerIdentity:
    """The server's identity; ``NotPrimary`` when it is in recovery."""
    row = await connection.fetchrow(_IDENTIFY)
    if row["recovery"]:
        raise NotPrimary("the server is in recovery (a standby), not the writable primary")
    identity = ServerIdentity(int(row["system_identifier"]), int(row["timeline"], 16), row["started"])
    return _known.setdefault(identity, identity)


class IdentifiedConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """A pooled connection that knows its server (set once, by the pool's ``init``)."""

    server: ServerIdentity | None = None


async def init_pooled(connection: IdentifiedConnection) -> None:
    connection.server = await identify(connection)


def connect_options(dsn: str) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect``/``create_pool``: a writable primary only.

    Passed explicitly, so neither a URL without the parameter nor
    ``PGTARGETSESSIONATTRS`` can let asyncpg settle for a standby.
    """
    return {"target_session_attrs": database_session_attrs(dsn)}
