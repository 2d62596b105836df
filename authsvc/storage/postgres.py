"""The PostgreSQL store (asyncpg): ``authsvc.core.ports.KeyStore``.

Driver errors never leave this module raw, and they are sorted in one place
(``PostgresStore._connection``, with the tuples below): the database being
away, overloaded, shutting down, read-only (a standby) or the driver's
connection state broken by a killed backend become ``Unavailable`` (the
caller fails closed), logged as one line; a serialization failure or deadlock
becomes ``Aborted`` (retry). Anything else is a bug of ours, propagates, and
is reported to callers as a generic INTERNAL error by the transport.

Every write that changes an Authorize answer publishes the key's digest on
``NOTIFY_CHANNEL`` in its own transaction; ``authsvc.storage.notify`` is the
feed that delivers those notifications to each process's decision cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Any

import asyncpg

from authsvc.config import scrub
from authsvc.core.errors import Aborted, AtCapacity, ConfigError, Unavailable
from authsvc.core.keys import Actor, ApiKey, KeyState, Role
from authsvc.core.ports import (
    NO_METRICS,
    PREFIX_BYTES,
    AuditEvent,
    AuditQuery,
    Found,
    KeyUpdate,
    NewKey,
    Page,
    PrefixPage,
    Recorder,
    Rotated,
    Rotation,
    TooManyActiveKeys,
    UsageCounts,
)
from authsvc.storage.migrate import migrate
from authsvc.storage.topology import NOT_WRITABLE, IdentifiedConnection, NotPrimary, connect_options, init_pooled

log = logging.getLogger(__name__)

# Create and revoke publish the key's digest here, in the same transaction,
# so every process can evict its cached copy (see authsvc.storage.notify).
NOTIFY_CHANNEL = "authsvc_keys"

_COLUMNS = (
    "id, org_id, name, prefix, scopes, created_by, create_time, expire_time, "
    "revoke_time, revoked_by, revoke_reason, last_used_time, rate_limit, labels, rotated_to, rotated_from"
)
# Active keys that hold a slot of the org's limit: a key in a rotation's grace
# period (rotated_to set) does not. $1 = org, $2 = now.
_LOOKUP = f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ANY($1::bytea[])"
# Keyset pages by the unique index on key_hash: each page an index range scan, however many keys there are.
# One bytes value per page, not a row per key: the database does the per-key work.
_PREFIXES = (
    "SELECT string_agg(substring(key_hash FROM 1 FOR $3), ''::bytea) FROM "
    "(SELECT key_hash FROM api_keys WHERE key_hash >= $1 ORDER BY key_hash LIMIT $2) AS page"
)
_COUNTED_ACTIVE = (
    "SELECT count(*) FROM api_keys WHERE org_id = $1 AND revoke_time IS NULL "
    "AND (expire_time IS NULL OR expire_time > $2) AND rotated_to IS NULL"
)
_STATE_FILTERS = {
    KeyState.ACTIVE: "AND revoke_time IS NULL AND (expire_time IS NULL OR expire_time > $2)",
    KeyState.EXPIRED: "AND revoke_time IS NULL AND expire_time <= $2",
    KeyState.REVOKED: "AND revoke_time IS NOT NULL AND $2::timestamptz IS NOT NULL",
}
# Errors that mean "the database is not there right now", as opposed to a bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # The protocol's state machine tripped, e.g. "cannot switch to state 12;
    # another operation is in progress" when pg_terminate_backend kills a
    # connection mid-call. The connection is unusable, not our code wrong.
    asyncpg.InternalClientError,
    # Server-side conditions of the infrastructure, not of the request:
    # shutting down or cancelled by an operator (class 57, with
    # CannotConnectNow, AdminShutdown, CrashShutdown), out of connections,
    # memory or disk (53), I/O errors (58). (A read-only server, 25006, is
    # handled on its own in PostgresStore._translate: the pool must look
    # for the writable primary again.)
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.PostgresSystemError,
    asyncpg.TargetServerAttributeNotMatched,  # every listed host is down or a standby
    NotPrimary,
)
# The server rolled the transaction back to resolve a conflict; the same call
# again may well succeed (class 40: serialization failure, deadlock).
RETRY_ERRORS: tuple[type[BaseException], ...] = (asyncpg.TransactionRollbackError,)
#: What ``PostgresStore._translate`` maps: everything the driver raises for a call.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
#: What a call is told when the store did not answer within its budget (fail closed).
STORE_UNAVAILABLE = "the key store is unavailable; retry shortly"
_READ_ONLY = "the database is read-only (no writable primary reached); retry shortly"
_ABORTED = "the key store aborted the call on a conflict with another; nothing was written, retry it"
# Lookup queries one process keeps in flight; lookups arriving meanwhile wait
# and go together in the next batch. Measured with h2load on one worker and
# the cache off: 1 in flight gave 3500 req/s, 2 gave 2670 (bigger batches,
# fewer queries); a lone lookup never waits either way.
_LOOKUPS_IN_FLIGHT = 1
# Digests one lookup query asks for at most; the rest wait for the next one.
# Bounds a query's size (and its time) when a flood of unknown keys queues up.
_MAX_BATCH = 256
_QUEUE_FULL = "too many key lookups are waiting; retry shortly"
# How long a ROLLBACK after a timed-out query, and then returning the
# connection to the pool, may each take before the connection is closed
# instead (see PostgresStore._connection). Normally instant.
_CLEANUP_TIMEOUT = 1.0


class _FaultLog:
    """One warning line per kind of database fault and second, never a traceback.

    An outage fails every call; a line for each (thousands a second on the
    hot path) would bury everything else. Only the exception's type and
    SQLSTATE are logged: a driver message may quote values from the query.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate:
            kind = f"{kind} (SQLSTATE {sqlstate})"
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.warning(
            "database call failed: %s; answered %s%s",
            kind,
            "ABORTED" if isinstance(exc, RETRY_ERRORS) else "UNAVAILABLE",
            f" ({more} more like it since the last line)" if more else "",
        )


_faults = _FaultLog()


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Pooled connections keep no session state, so skip asyncpg's reset query.

    The default reset runs a statement on every release, which doubles the
    database's work on the hot path.
    """


def _connect_error(exc: BaseException, dsn: str) -> Exception:
    """The one translation of a failed connect at start-up: a bad URL, or a database that is not there.

    The driver's text may quote parts of the URL, the password among them
    (asyncpg's parser does), so it is scrubbed. The messages name no
    setting: the caller knows which one gave the URL.
    """
    detail = scrub(str(exc), dsn)
    if isinstance(exc, ValueError):  # asyncpg's DSN parser, and ClientConfigurationError (?sslmode=bogus)
        return ConfigError(f"is not usable: {detail}")
    return Unavailable(f"cannot connect to a writable PostgreSQL primary ({type(exc).__name__}: {detail})")


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, connect_timeout: float = 5.0) -> asyncpg.Pool:
    """``min_size`` 2: while a background task holds one connection (the digest table's load at start, a
    last-used flush), a lookup finds another open, instead of spending its store timeout on a connect."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            reset=_no_reset,
            connection_class=IdentifiedConnection,
            init=init_pooled,
            **connect_options(dsn),
        )
    except (ValueError, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:  # ValueError first: see _connect_error
        raise _connect_error(exc, dsn) from None
    assert pool is not None
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection for a command (migrate, audit), its failures translated like the pool's."""
    try:
        return await asyncpg.connect(dsn, timeout=5.0, **connect_options(dsn))
    except (ValueError, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise _connect_error(exc, dsn) from None


async def run_migrations(dsn: str) -> list[str]:
    """Bring the schema to head (see ``authsvc.storage.migrate``); returns the steps applied now."""
    connection = await connect(dsn)
    try:
        return await migrate(connection)
    finally:
        await connection.close()


def _to_key(row: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        org_id=row["org_id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=tuple(row["scopes"]),
        created_by=row["created_by"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        revoke_time=row["revoke_time"],
        revoked_by=row["revoked_by"],
        revoke_reason=row["revoke_reason"],
        last_used_time=row["last_used_time"],
        rate_limit=row["rate_limit"],
        labels=_labels(row["labels"]),
        rotated_to=str(row["rotated_to"]) if row["rotated_to"] else "",
        rotated_from=str(row["rotated_from"]) if row["rotated_from"] else "",
    )


def _role(stored: str) -> Role:
    """Audit rows store the role's lower-case name; one written by hand may say anything."""
    try:
        return Role[stored.upper()]
    except KeyError:
        return Role.UNSPECIFIED


def _labels(raw: str | None) -> tuple[tuple[str, str], ...]:
    """asyncpg hands jsonb over as text; labels are sorted pairs in the domain."""
    if not raw or raw == "{}":
        return ()
    decoded: dict[str, str] = json.loads(raw)
    return tuple(sorted(decoded.items()))


async def _lock_org(conn: asyncpg.Connection, org_id: str) -> None:
    """Serialise writes that change an org's count of active keys: concurrent calls cannot all see 9 and add a 10th."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('authsvc.org:' || $1, 0))", org_id)


async def _notify(conn: asyncpg.Connection, digests: list[bytes]) -> None:
    """Publish changed keys in the writing transaction: delivered exactly when (and if) it commits.

    The payload is the digest in hex, then ``:`` and the database's clock in
    epoch microseconds, taken just before the commit: feeds measure the
    invalidation lag from it (see ``authsvc.storage.notify``).
    """
    await conn.execute(
        "SELECT pg_notify($1, d || ':' || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) "
        "FROM unnest($2::text[]) AS d",
        NOTIFY_CHANNEL,
        [d.hex() for d in digests],
    )


class PostgresStore:
    """``authsvc.storage.Store`` on PostgreSQL."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        lookup_timeout: float = 0.1,
        write_timeout: float = 5.0,
        max_waiting_lookups: int = 1024,
        metrics: Recorder = NO_METRICS,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._lookup_timeout = lookup_timeout
        self._write_timeout = write_timeout
        # Lookups waiting for the next batch, by digest; see find_by_digest.
        self._waiting: dict[bytes, asyncio.Future[Found]] = {}
        self._callers: dict[bytes, int] = {}  # callers still waiting for each digest in _waiting
        self._max_waiting = max_waiting_lookups
        self._lookups: set[asyncio.Task[None]] = set()  # strong references to running batches

    @asynccontextmanager
    async def _connection(
        self, budget: float, operation: str, *, hot: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for at most ``budget`` seconds; then ``Unavailable``.

        The clean-up is bounded too. When a query times out, asyncpg asks the
        server to cancel it, and both a transaction's ROLLBACK and the
        release wait, without a limit, for the server to acknowledge; a
        database that hangs rather than drops connections never does. So the
        caller's clean-up (ROLLBACK) gets ``_CLEANUP_TIMEOUT`` past the budget,
        and the release as much again, after which asyncpg closes the
        connection. ``hot``: the lookup path, which runs no transaction and
        keeps to one timer. ``operation`` names the call in the error metric.
        """
        connection: asyncpg.Connection | None = None
        guard = contextlib.nullcontext() if hot else asyncio.timeout(budget + _CLEANUP_TIMEOUT)
        try:
            async with guard, asyncio.timeout(budget):  # one budget for acquiring and using it
                connection = await self._pool.acquire()
                yield connection
        except _DRIVER_ERRORS as exc:
            raise await self._translate(exc, operation, connection) from None
        finally:
            if connection is not None:
                await self._release(connection)

    async def _translate(
        self, exc: BaseException, operation: str, connection: asyncpg.Connection | None
    ) -> BaseException:
        """The domain error for a driver error (``_DRIVER_ERRORS``), counted; the one place that maps them."""
        self._metrics.store_error(operation)
        if isinstance(exc, CONNECTION_ERRORS):
            if connection is not None and isinstance(exc, asyncpg.InternalClientError):
                # Its protocol state is unknown: it must not serve the next call. (A proxy
                # the pool has already detached from a lost connection refuses the call.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
            _faults.report(exc)
            return Unavailable(STORE_UNAVAILABLE)
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            # A server that turned read-only under us: have every pooled
            # connection find the writable primary again.
            _faults.report(exc)
            await self._pool.expire_connections()
            return Unavailable(_READ_ONLY)
        if isinstance(exc, RETRY_ERRORS):
            _faults.report(exc)
            return Aborted(_ABORTED)
        return exc  # any other PostgresError: the caller's to handle (a constraint, say)

    async def _release(self, connection: asyncpg.Connection) -> None:
        try:
            await self._pool.release(connection, timeout=_CLEANUP_TIMEOUT)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            pass  # asyncpg has terminated the connection; the pool opens a new one when needed

    async def ping(self, budget: float = 1.0) -> bool:
        """Whether the writable primary answers (a standby or a read-only server is not it)."""
        try:
            async with self._connection(budget, "ping") as conn:
                not_writable = await conn.fetchval(NOT_WRITABLE)
        except Unavailable:
            return False
        if not_writable:
            await self._pool.expire_connections()  # reconnect, to a writable server or not at all
        return not not_writable

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        async with self._connection(self._write_timeout, "create_key") as conn, conn.transaction():
            await _lock_org(conn, new.org_id)
            active = await conn.fetchval(_COUNTED_ACTIVE, new.org_id, now)
            if active >= max_active:
                raise TooManyActiveKeys
            key = await self._insert_key(conn, new, now)
            await self._insert_audit(
                conn,
                "key.create",
                new.org_id,
                actor,
                key.id,
                "ok",
                {"name": new.name, "scopes": list(new.scopes), "prefix": new.prefix, "labels": dict(new.labels)},
            )
            # A negative cache entry for this digest may exist somewhere.
            await _notify(conn, [new.digest])
            return key

    @staticmethod
    async def _insert_key(conn: asyncpg.Connection, new: NewKey, now: datetime) -> ApiKey:
        row = await conn.fetchrow(
            f"INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scopes, created_by, create_time, "
            f"expire_time, rate_limit, labels, rotated_from) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12) RETURNING {_COLUMNS}",
            uuid.uuid4(),
            new.org_id,
            new.name,
            new.prefix,
            new.digest,
            list(new.scopes),
            new.created_by,
            now,
            new.expire_time,
            new.rate_limit,
            json.dumps(dict(new.labels)),
            uuid.UUID(new.rotated_from) if new.rotated_from else None,
        )
        return _to_key(row)

    async def _locked_key(self, conn: asyncpg.Connection, org_id: str, key_id: str) -> tuple[ApiKey, bytes] | None:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE org_id = $1 AND id = $2 FOR UPDATE",
            org_id,
            uuid.UUID(key_id),
        )
        return (_to_key(row), bytes(row["key_hash"])) if row is not None else None

    async def rotate_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, plan: Callable[[ApiKey], Rotation], reason: str
    ) -> Rotated | None:
        async with self._connection(self._write_timeout, "rotate_key") as conn, conn.transaction():
            # The same lock as create_key: the org's count of keys holding a
            # slot is the same before and after, and no create sees it halfway.
            await _lock_org(conn, org_id)
            found = await self._locked_key(conn, org_id, key_id)
            if found is None:
                return None
            old, old_digest = found
            rotation = plan(old)  # raises (and rolls back) when the key cannot be rotated
            key = await self._insert_key(conn, rotation.successor, now)
            row = await conn.fetchrow(
                f"UPDATE api_keys SET rotated_to = $3, expire_time = $4 WHERE org_id = $1 AND id = $2 "
                f"RETURNING {_COLUMNS}",
                org_id,
                uuid.UUID(key_id),
                uuid.UUID(key.id),
                rotation.old_expire_time,
            )
            previous = _to_key(row)
            await self._insert_audit(
                conn,
                "key.rotate",
                org_id,
                actor,
                key_id,
                "ok",
                {
                    "rotated_to": key.id,
                    "prefix": key.prefix,
                    "old_expire_time": rotation.old_expire_time.isoformat(),
                    "reason": reason,
                },
            )
            await self._insert_audit(
                conn,
                "key.create",
                org_id,
                actor,
                key.id,
                "ok",
                {"name": key.name, "scopes": list(key.scopes), "prefix": key.prefix, "rotated_from": key_id},
            )
            digests = (old_digest, rotation.successor.digest)
            await _notify(conn, list(digests))
            return Rotated(key=key, previous=previous, digests=digests)

    async def update_key(
        self, org_id: str, key_id: str, actor: Actor, now: datetime, change: Callable[[ApiKey], KeyUpdate]
    ) -> tuple[ApiKey, bytes] | None:
        async with self._connection(self._write_timeout, "update_key") as conn, conn.transaction():
            found = await self._locked_key(conn, org_id, key_id)
            if found is None:
                return None
            current, digest = found
            update = change(current)  # raises (and rolls back) when the key cannot be changed
            row = await conn.fetchrow(
                f"UPDATE api_keys SET name = $3, labels = $4::jsonb WHERE org_id = $1 AND id = $2 RETURNING {_COLUMNS}",
                org_id,
                uuid.UUID(key_id),
                update.name,
                json.dumps(dict(update.labels)),
            )
            await self._insert_audit(
                conn, "key.update", org_id, actor, key_id, "ok", {"name": update.name, "labels": dict(update.labels)}
            )
            await _notify(conn, [digest])
            return _to_key(row), digest

    async def revoke_keys_created_by(
        self, org_id: str, created_by: str, actor: Actor, reason: str, now: datetime
    ) -> list[tuple[ApiKey, bytes]]:
        async with self._connection(self._write_timeout, "revoke_keys_created_by") as conn, conn.transaction():
            # Serialised with creates and rotations in the org: a key one of
            # them commits while this runs is either revoked here or created after.
            await _lock_org(conn, org_id)
            rows = await conn.fetch(
                f"UPDATE api_keys SET revoke_time = $2, revoked_by = $3, revoke_reason = $4 "
                f"WHERE org_id = $1 AND created_by = $5 AND revoke_time IS NULL "
                f"AND (expire_time IS NULL OR expire_time > $2) RETURNING {_COLUMNS}, key_hash",
                org_id,
                now,
                actor.user_id,
                reason,
                created_by,
            )
            revoked = [(_to_key(r), bytes(r["key_hash"])) for r in rows]
            revoked.sort(key=lambda pair: (pair[0].create_time, pair[0].id), reverse=True)
            await conn.executemany(
                "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail, caller) "
                "VALUES ($1, $2, $3, 'key.revoke', $4, 'ok', $5::jsonb, $6)",
                [
                    (
                        org_id,
                        actor.user_id,
                        actor.role.name.lower(),
                        uuid.UUID(key.id),
                        json.dumps({"reason": reason, "created_by": created_by}),
                        actor.caller,
                    )
                    for key, _ in revoked
                ],
            )
            await self._insert_audit(
                conn,
                "key.revoke_created_by",
                org_id,
                actor,
                None,
                "ok",
                {"created_by": created_by, "reason": reason, "revoked": [key.id for key, _ in revoked]},
            )
            if revoked:
                await _notify(conn, [digest for _, digest in revoked])
            return revoked

    async def get_key(self, org_id: str, key_id: str) -> ApiKey | None:
        async with self._connection(self._write_timeout, "get_key") as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2", org_id, uuid.UUID(key_id)
            )
        return _to_key(row) if row else None

    async def list_keys(self, org_id: str, state: KeyState | None, now: datetime, offset: int, limit: int) -> Page:
        where = "WHERE org_id = $1 " + (
            _STATE_FILTERS[state] if state is not None else "AND $2::timestamptz IS NOT NULL"
        )
        async with (
            self._connection(self._write_timeout, "list_keys") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            total = await conn.fetchval(f"SELECT count(*) FROM api_keys {where}", org_id, now)
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY create_time DESC, id DESC LIMIT $3 OFFSET $4",
                org_id,
                now,
                limit,
                offset,
            )
        return Page(keys=[_to_key(r) for r in rows], total=total)

    async def revoke_key(
        self, org_id: str, key_id: str, actor: Actor, reason: str, now: datetime
    ) -> tuple[ApiKey, bytes] | None:
        async with self._connection(self._write_timeout, "revoke_key") as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE api_keys SET revoke_time = $3, revoked_by = $4, revoke_reason = $5 "
                f"WHERE org_id = $1 AND id = $2 AND revoke_time IS NULL RETURNING {_COLUMNS}, key_hash",
                org_id,
                uuid.UUID(key_id),
                now,
                actor.user_id,
                reason,
            )
            if row is None:
                existing = await conn.fetchrow(
                    f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE org_id = $1 AND id = $2",
                    org_id,
                    uuid.UUID(key_id),
                )
                if existing is None:
                    return None
                await self._insert_audit(
                    conn, "key.revoke", org_id, actor, key_id, "already_revoked", {"reason": reason}
                )
                return _to_key(existing), bytes(existing["key_hash"])
            await self._insert_audit(conn, "key.revoke", org_id, actor, key_id, "ok", {"reason": reason})
            await _notify(conn, [bytes(row["key_hash"])])
            return _to_key(row), bytes(row["key_hash"])

    async def find_by_digest(self, digest: bytes) -> Found:
        """Look a key up by digest, batched with the other lookups waiting at the same time.

        Under load most of a cache miss's cost is per query (driver, pool,
        and PostgreSQL's parse/plan). So at most ``_LOOKUPS_IN_FLIGHT``
        queries run at once; lookups that arrive meanwhile wait and then
        share one ``key_hash = ANY($1)`` query, and concurrent lookups of the
        same digest share one result. Light load: a batch of one, at once.
        The caller's whole wait, queueing included, is bounded by the lookup
        budget (fail closed).

        Overload: at most ``max_waiting_lookups`` distinct digests wait;
        past that a lookup is refused at once with ``Unavailable`` (a flood
        of forged keys must not queue up in front of real ones, nor grow
        memory), and a digest whose every caller has given up (timed out,
        or cancelled by its client) leaves the queue before it is asked for.
        """
        waiting = self._waiting.get(digest)
        if waiting is None:
            if len(self._waiting) >= self._max_waiting:
                raise AtCapacity(_QUEUE_FULL)  # overload, not an outage: counted as at_capacity
            loop = asyncio.get_running_loop()
            if not self._waiting and len(self._lookups) < _LOOKUPS_IN_FLIGHT:
                loop.call_soon(self._dispatch)
            waiting = self._waiting[digest] = loop.create_future()
            # A failure nobody is left waiting for (callers timed out) is not an unhandled error.
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._callers[digest] = self._callers.get(digest, 0) + 1
        try:
            async with asyncio.timeout(self._lookup_timeout):
                # Shielded: one caller giving up must not cancel the others' answer.
                return await asyncio.shield(waiting)
        except TimeoutError:
            raise Unavailable(STORE_UNAVAILABLE) from None
        finally:
            self._leave(digest, waiting)

    def _leave(self, digest: bytes, waiting: asyncio.Future[Found]) -> None:
        left = self._callers.get(digest, 0) - 1
        if self._waiting.get(digest) is not waiting:
            return  # already in a batch (its count went with it) or answered
        if left > 0:
            self._callers[digest] = left
            return
        # Nobody wants this answer any more: drop it rather than ask for it.
        del self._waiting[digest]
        self._callers.pop(digest, None)
        waiting.cancel()

    def _dispatch(self) -> None:
        if not self._waiting or len(self._lookups) >= _LOOKUPS_IN_FLIGHT:
            return
        if len(self._waiting) <= _MAX_BATCH:
            batch, self._waiting = self._waiting, {}
        else:  # the oldest first; the rest go in the next query
            digests = list(self._waiting)[:_MAX_BATCH]
            batch = {d: self._waiting.pop(d) for d in digests}
        for d in batch:
            self._callers.pop(d, None)
        task = asyncio.get_running_loop().create_task(self._lookup(batch))
        self._lookups.add(task)
        task.add_done_callback(self._lookup_done)

    def _lookup_done(self, task: asyncio.Task[None]) -> None:
        self._lookups.discard(task)
        self._dispatch()  # whatever queued up while this query ran

    async def _lookup(self, batch: dict[bytes, asyncio.Future[Found]]) -> None:
        # ``_connection``'s work written out, without its context managers: this
        # runs once per batch of misses, and each async context manager costs
        # coroutines of its own. Same budget, same error mapping (``_translate``).
        self._metrics.lookup_batch(len(batch))
        connection: asyncpg.Connection | None = None
        try:
            try:
                async with asyncio.timeout(self._lookup_timeout):
                    connection = await self._pool.acquire()
                    rows = await connection.fetch(_LOOKUP, list(batch))
                source = connection.server  # identified once, when the pool opened the connection
            except _DRIVER_ERRORS as exc:
                raise await self._translate(exc, "lookup", connection) from None
            finally:
                if connection is not None:
                    await self._release(connection)
        except BaseException as exc:  # every waiter learns of the failure; nothing is left hanging
            error = exc if isinstance(exc, Exception) else Unavailable(STORE_UNAVAILABLE)
            for future in batch.values():
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        found = {bytes(row["key_hash"]): row for row in rows}
        for digest, future in batch.items():
            if not future.done():
                row = found.get(digest)
                future.set_result(Found(_to_key(row) if row is not None else None, source))

    async def key_prefixes(self, start: bytes, limit: int) -> PrefixPage:
        async with self._connection(self._write_timeout, "key_prefixes") as conn:
            prefixes = await conn.fetchval(_PREFIXES, start, limit, PREFIX_BYTES)
            return PrefixPage(prefixes or b"", conn.server)

    async def record_last_used(
        self, used: Mapping[str, datetime], counts: Mapping[tuple[str, date], UsageCounts] | None = None
    ) -> None:
        if not used and not counts:
            return
        # Sorted, so concurrent flushes from several processes lock rows in one order (no deadlocks).
        pairs = sorted((uuid.UUID(k), t) for k, t in used.items())
        rows = sorted((uuid.UUID(k), day, c[0], c[1], c[2]) for (k, day), c in (counts or {}).items())
        async with self._connection(self._write_timeout, "record_last_used") as conn:
            # One statement: a data-modifying CTE runs whether or not the outer query reads it.
            await conn.execute(
                "WITH used AS (UPDATE api_keys AS k SET last_used_time = v.t "
                "FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, t) "
                "WHERE k.id = v.id AND (k.last_used_time IS NULL OR k.last_used_time < v.t) RETURNING 1) "
                "INSERT INTO key_usage_days (key_id, day, allowed, denied, rate_limited) "
                "SELECT * FROM unnest($3::uuid[], $4::date[], $5::bigint[], $6::bigint[], $7::bigint[]) "
                "ON CONFLICT (key_id, day) DO UPDATE SET allowed = key_usage_days.allowed + EXCLUDED.allowed, "
                "denied = key_usage_days.denied + EXCLUDED.denied, "
                "rate_limited = key_usage_days.rate_limited + EXCLUDED.rate_limited",
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [r[4] for r in rows],
            )

    async def key_usage(self, key_id: str, first: date, last: date) -> dict[date, UsageCounts]:
        async with self._connection(self._write_timeout, "key_usage") as conn:
            rows = await conn.fetch(
                "SELECT day, allowed, denied, rate_limited FROM key_usage_days "
                "WHERE key_id = $1 AND day BETWEEN $2 AND $3",
                uuid.UUID(key_id),
                first,
                last,
            )
        return {r["day"]: (r["allowed"], r["denied"], r["rate_limited"]) for r in rows}

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        async with self._connection(self._write_timeout, "audit") as conn:
            await self._insert_audit(conn, action, org_id, actor, key_id, outcome, detail)

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        # Filters are bound as NULL-or-value so one statement (and its plan) serves every combination;
        # (org_id, id) is indexed (0004), and within an org id order is chain order.
        async with self._connection(self._write_timeout, "list_audit_events") as conn:
            rows = await conn.fetch(
                "SELECT id, occurred_at, org_id, actor_user_id, actor_role, caller, action, key_id, outcome, "
                "detail::text AS detail, hash FROM audit_events "
                "WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2) AND ($3::uuid IS NULL OR key_id = $3) "
                "AND ($4::text IS NULL OR action = $4) AND ($5::timestamptz IS NULL OR occurred_at >= $5) "
                "AND ($6::timestamptz IS NULL OR occurred_at < $6) ORDER BY id DESC LIMIT $7",
                query.org_id,
                query.before_id,
                uuid.UUID(query.key_id) if query.key_id else None,
                query.action,
                query.start_time,
                query.end_time,
                query.limit,
            )
        return [
            AuditEvent(
                id=r["id"],
                time=r["occurred_at"],
                org_id=r["org_id"],
                actor=Actor(r["actor_user_id"], _role(r["actor_role"]), caller=r["caller"]),
                action=r["action"],
                key_id=str(r["key_id"]) if r["key_id"] is not None else None,
                outcome=r["outcome"],
                detail=json.loads(r["detail"]),
                hash=bytes(r["hash"]),
            )
            for r in rows
        ]

    @staticmethod
    async def _insert_audit(
        conn: asyncpg.Connection,
        action: str,
        org_id: str,
        actor: Actor,
        key_id: str | None,
        outcome: str,
        detail: Mapping[str, object],
    ) -> None:
        await conn.execute(
            "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail, caller) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)",
            org_id,
            actor.user_id,
            actor.role.name.lower(),
            action,
            uuid.UUID(key_id) if key_id else None,
            outcome,
            json.dumps(dict(detail)),
            actor.caller,
        )
