"""Fixtures: a real PostgreSQL, a real gRPC server on a real port, real channels.

PostgreSQL: ``AUTHSVC_TEST_DATABASE_URL`` points the suite at an existing
server; without it (as in ``.ci/run``, which runs the README's command as
is) the suite starts the embedded one (pgserver). Either way the session creates a fresh database and
drops it at the end, and every test works in its own organization.

Redis: ``AUTHSVC_TEST_REDIS_URL`` (default redis://127.0.0.1:6379/15). Tests
that need it skip, saying so, when it is unreachable, except under CI=true,
where an unreachable Redis fails them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2_grpc

from authsvc.config import Secret, Settings
from authsvc.runtime import App
from tests.support import Stub, free_port


def _server_url() -> str:
    url = os.environ.get("AUTHSVC_TEST_DATABASE_URL")
    if url:
        return url
    from authsvc.storage import embedded

    return embedded.start(Path(tempfile.gettempdir()) / "authsvc-test-embedded")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, empty database for this test session."""
    server = _server_url()
    name = f"authsvc_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield _with_database(server, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    # Port 0: every App of the suite gets its own ext_authz HTTP port, never the shared default.
    return Settings(database_url=Secret(database_url), last_used_flush_seconds=0.2, http_authz_listen="127.0.0.1:0")


@pytest.fixture(scope="session")
async def app(settings: Settings, database_url: str) -> AsyncIterator[App]:
    """authsvc running in this process on a real port."""
    server = App(settings, database_url, listen=f"127.0.0.1:{free_port()}")
    await server.start()
    await asyncio.wait_for(server.feed.connected.wait(), 5)
    yield server
    await server.stop(grace=1)


@pytest.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> Stub:
    return authsvc_pb2_grpc.KeyServiceStub(channel)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to check what was really stored."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("AUTHSVC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Redis at {url}: {exc}")
        pytest.skip(f"no Redis at {url} (set AUTHSVC_TEST_REDIS_URL): {exc}")
    return url
