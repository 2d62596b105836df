"""The PostgreSQL store (asyncpg).

Driver errors never leave this module raw: lost connections and timeouts
become ``Unavailable`` (the caller fails closed); anything else propagates and
is reported to callers as a generic INTERNAL error by the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from authsvc.errors import ConfigError, Unavailable
from authsvc.keys import Actor, ApiKey, KeyState
from authsvc.metrics import NO_METRICS, Recorder
from authsvc.storage import NewKey, Page, TooManyActiveKeys

# Create and revoke publish the key's digest here, in the same transaction,
# so every process can evict its cached copy (see authsvc.cache).
NOTIFY_CHANNEL = "authsvc_keys"
# The payload: the digest in hex, then ":" and the database's clock in epoch
# microseconds, taken by the transaction's last statement, just before its
# commit (listeners measure the invalidation lag from it; see authsvc.invalidation).
_NOTIFY = "SELECT pg_notify($1, $2 || ':' || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)"

_COLUMNS = (
    "id, org_id, name, prefix, scopes, created_by, create_time, expire_time, "
    "revoke_time, revoked_by, revoke_reason, last_used_time, rate_limit"
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
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
_UNAVAILABLE = "the key store is unavailable; retry shortly"
# Lookup queries one process keeps in flight; lookups arriving meanwhile wait
# and go together in the next batch. Measured with h2load on one worker and
# the cache off: 1 in flight gave 3500 req/s, 2 gave 2670 (bigger batches,
# fewer queries); a lone lookup never waits either way.
_LOOKUPS_IN_FLIGHT = 1
# How long a ROLLBACK after a timed-out query, and then returning the
# connection to the pool, may each take before the connection is closed
# instead (see PostgresStore._connection). Normally instant.
_CLEANUP_TIMEOUT = 1.0


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Pooled connections keep no session state, so skip asyncpg's reset query.

    The default reset runs a statement on every release, which doubles the
    database's work on the hot path.
    """


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 5.0) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, timeout=connect_timeout, reset=_no_reset
        )
    except ValueError as exc:  # first: asyncpg's ClientConfigurationError (?sslmode=bogus) is an InterfaceError too
        raise ConfigError(f"AUTHSVC_DATABASE_URL is not usable: {exc}") from None
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"cannot connect to PostgreSQL: {exc}") from None
    assert pool is not None
    return pool


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
    )


class PostgresStore:
    """``authsvc.storage.Store`` on PostgreSQL."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        lookup_timeout: float = 0.1,
        write_timeout: float = 5.0,
        metrics: Recorder = NO_METRICS,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._lookup_timeout = lookup_timeout
        self._write_timeout = write_timeout
        # Lookups waiting for the next batch, by digest; see find_by_digest.
        self._waiting: dict[bytes, asyncio.Future[ApiKey | None]] = {}
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
        except CONNECTION_ERRORS:
            self._metrics.store_error(operation)
            raise Unavailable(_UNAVAILABLE) from None
        except asyncpg.PostgresError:
            self._metrics.store_error(operation)
            raise
        finally:
            if connection is not None:
                await self._release(connection)

    async def _release(self, connection: asyncpg.Connection) -> None:
        try:
            await self._pool.release(connection, timeout=_CLEANUP_TIMEOUT)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            pass  # asyncpg has terminated the connection; the pool opens a new one when needed

    async def ping(self, budget: float = 1.0) -> bool:
        try:
            async with self._connection(budget, "ping") as conn:
                await conn.fetchval("SELECT 1")
        except Unavailable:
            return False
        return True

    async def create_key(self, new: NewKey, actor: Actor, max_active: int, now: datetime) -> ApiKey:
        async with self._connection(self._write_timeout, "create_key") as conn, conn.transaction():
            # Serialise creates per org so concurrent calls cannot all see
            # "9 active" and each insert a 10th.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('authsvc.org:' || $1, 0))", new.org_id)
            active = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE org_id = $1 AND revoke_time IS NULL "
                "AND (expire_time IS NULL OR expire_time > $2)",
                new.org_id,
                now,
            )
            if active >= max_active:
                raise TooManyActiveKeys
            row = await conn.fetchrow(
                f"INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scopes, created_by, create_time, "
                f"expire_time, rate_limit) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_COLUMNS}",
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
            )
            key = _to_key(row)
            await self._insert_audit(
                conn,
                "key.create",
                new.org_id,
                actor,
                key.id,
                "ok",
                {"name": new.name, "scopes": list(new.scopes), "prefix": new.prefix},
            )
            # A negative cache entry for this digest may exist somewhere.
            await conn.execute(_NOTIFY, NOTIFY_CHANNEL, new.digest.hex())
            return key

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
            await conn.execute(_NOTIFY, NOTIFY_CHANNEL, bytes(row["key_hash"]).hex())
            return _to_key(row), bytes(row["key_hash"])

    async def find_by_digest(self, digest: bytes) -> ApiKey | None:
        """Look a key up by digest, batched with the other lookups waiting at the same time.

        Under load most of a cache miss's cost is per query (driver, pool,
        and PostgreSQL's parse/plan). So at most ``_LOOKUPS_IN_FLIGHT``
        queries run at once; lookups that arrive meanwhile wait and then
        share one ``key_hash = ANY($1)`` query, and concurrent lookups of the
        same digest share one result. Light load: a batch of one, at once.
        The caller's whole wait, queueing included, is bounded by the lookup
        budget (fail closed).
        """
        waiting = self._waiting.get(digest)
        if waiting is None:
            loop = asyncio.get_running_loop()
            if not self._waiting and len(self._lookups) < _LOOKUPS_IN_FLIGHT:
                loop.call_soon(self._dispatch)
            waiting = self._waiting[digest] = loop.create_future()
            # A failure nobody is left waiting for (callers timed out) is not an unhandled error.
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async with asyncio.timeout(self._lookup_timeout):
                # Shielded: one caller giving up must not cancel the others' answer.
                return await asyncio.shield(waiting)
        except TimeoutError:
            raise Unavailable(_UNAVAILABLE) from None

    def _dispatch(self) -> None:
        if not self._waiting or len(self._lookups) >= _LOOKUPS_IN_FLIGHT:
            return
        batch, self._waiting = self._waiting, {}
        task = asyncio.get_running_loop().create_task(self._lookup(batch))
        self._lookups.add(task)
        task.add_done_callback(self._lookup_done)

    def _lookup_done(self, task: asyncio.Task[None]) -> None:
        self._lookups.discard(task)
        self._dispatch()  # whatever queued up while this query ran

    async def _lookup(self, batch: dict[bytes, asyncio.Future[ApiKey | None]]) -> None:
        self._metrics.lookup_batch(len(batch))
        try:
            async with self._connection(self._lookup_timeout, "lookup", hot=True) as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ANY($1::bytea[])", list(batch)
                )
        except BaseException as exc:  # every waiter learns of the failure; nothing is left hanging
            error = exc if isinstance(exc, Exception) else Unavailable(_UNAVAILABLE)
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
                future.set_result(_to_key(row) if row is not None else None)

    async def record_last_used(self, used: Mapping[str, datetime]) -> None:
        if not used:
            return
        ids = [uuid.UUID(k) for k in used]
        times = list(used.values())
        async with self._connection(self._write_timeout, "record_last_used") as conn:
            await conn.execute(
                "UPDATE api_keys AS k SET last_used_time = v.t "
                "FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, t) "
                "WHERE k.id = v.id AND (k.last_used_time IS NULL OR k.last_used_time < v.t)",
                ids,
                times,
            )

    async def audit(
        self, action: str, org_id: str, actor: Actor, key_id: str | None, outcome: str, detail: Mapping[str, object]
    ) -> None:
        async with self._connection(self._write_timeout, "audit") as conn:
            await self._insert_audit(conn, action, org_id, actor, key_id, outcome, detail)

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
            "INSERT INTO audit_events (org_id, actor_user_id, actor_role, action, key_id, outcome, detail) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
            org_id,
            actor.user_id,
            actor.role.name.lower(),
            action,
            uuid.UUID(key_id) if key_id else None,
            outcome,
            json.dumps(dict(detail)),
        )
