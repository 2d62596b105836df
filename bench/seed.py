"""The bench database: created if missing, migrated with ``authsvc migrate``, seeded with 1M keys.

Seed keys are real keys of the deployment's format (prefix, 43 base62
characters, CRC32 checksum) so authsvc's format check passes, but their
random part is derived from the key's index (BLAKE2b of the index) instead
of ``secrets``: the bench can then rebuild any seed key from its number
without storing a million secrets, and a seeded database is reused across
runs. These keys protect nothing; never seed a real database this way.

Rows go in with COPY (asyncpg ``copy_records_to_table``), the only way to
load a million rows in seconds, into the very table and indexes the
migrations create.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from authsvc.core.keyformat import BASE62, DISPLAY_PREFIX_LENGTH, RANDOM_LENGTH, checksum, digest
from bench.procs import PYTHON, ROOT

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/authsvc_bench"
KEY_PREFIX = "authsvc"
SEED_ORG_PREFIX = "org-bench-"
KEYS_PER_ORG = 10
# byte -> base62 character; the slight modulo bias is irrelevant for bench keys.
_TO_BASE62 = bytes(ord(BASE62[b % 62]) for b in range(256))
_COLUMNS = ("id", "org_id", "name", "prefix", "key_hash", "scopes", "created_by", "create_time")


def seed_key(index: int) -> str:
    """Seed key number ``index``: the same string on every run."""
    raw = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=RANDOM_LENGTH, person=b"authsvc-bench").digest()
    body = f"{KEY_PREFIX}_{raw.translate(_TO_BASE62).decode('ascii')}"
    return body + checksum(body)


def seed_key_id(index: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-4000-8000-{index:012x}")


def seed_org(index: int) -> str:
    return f"{SEED_ORG_PREFIX}{index // KEYS_PER_ORG:06d}"


def _rows(start: int, stop: int, now: datetime) -> Iterator[tuple[object, ...]]:
    scopes = ["read", "write"]
    for i in range(start, stop):
        key = seed_key(i)
        yield (seed_key_id(i), seed_org(i), f"bench key {i}", key[:DISPLAY_PREFIX_LENGTH], digest(key), scopes,
               f"user-{i % 1000:04d}", now)


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def ensure_database(url: str) -> None:
    """CREATE DATABASE if it does not exist (connecting to the server's maintenance database only for that)."""
    name = database_name(url)
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unexpected bench database name {name!r}")
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def migrate(url: str) -> None:
    """Schema exactly as production gets it: ``authsvc migrate``."""
    subprocess.run(
        [PYTHON, "-m", "authsvc", "migrate"],
        env={**os.environ, "AUTHSVC_DATABASE_URL": url},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


async def seed(url: str, count: int, log: object = print) -> float:
    """Make sure seed keys 0..count-1 (and no others) are in api_keys; returns seconds spent (0 if reused)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        have = await conn.fetchval("SELECT count(*) FROM api_keys WHERE org_id LIKE $1", SEED_ORG_PREFIX + "%")
        if have == count and count:
            ends = [digest(seed_key(0)), digest(seed_key(count - 1))]
            found = await conn.fetchval("SELECT count(*) FROM api_keys WHERE key_hash = ANY($1::bytea[])", ends)
            if found == 2:
                return 0.0
        started = time.monotonic()
        await conn.execute("DELETE FROM api_keys WHERE org_id LIKE $1", SEED_ORG_PREFIX + "%")
        now = datetime.now(UTC)
        chunk = 50_000
        for start in range(0, count, chunk):
            records = list(_rows(start, min(start + chunk, count), now))
            await conn.copy_records_to_table("api_keys", records=records, columns=_COLUMNS)
            if callable(log) and (start // chunk) % 4 == 3:
                log(f"  seeded {start + len(records):,} / {count:,} keys")
        await conn.execute("VACUUM ANALYZE api_keys")
        return time.monotonic() - started
    finally:
        await conn.close()


async def table_size(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {
            "rows": int(await conn.fetchval("SELECT count(*) FROM api_keys")),
            "table_bytes": int(await conn.fetchval("SELECT pg_table_size('api_keys')")),
            "index_bytes": int(await conn.fetchval("SELECT pg_indexes_size('api_keys')")),
        }
    finally:
        await conn.close()


def table_sizes(url: str) -> dict[str, int]:
    return asyncio.run(table_size(url))


def prepare(url: str, count: int) -> float:
    asyncio.run(ensure_database(url))
    migrate(url)
    return asyncio.run(seed(url, count))


async def _backend_pids(url: str) -> list[int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database_name(url)
        )
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


def backend_pids(url: str) -> list[int]:
    """PostgreSQL backends serving the bench database (to charge their CPU to the scenario)."""
    return asyncio.run(_backend_pids(url))
