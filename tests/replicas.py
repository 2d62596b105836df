"""In-process authsvc replicas for tests: another App on the same database, with its own cache and feed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2_grpc

from authsvc.config import Secret, Settings
from authsvc.runtime import App
from tests.support import Stub, TcpProxy, free_port


@asynccontextmanager
async def running(settings: Settings, database_url: str, **overrides: Any) -> AsyncIterator[tuple[App, Stub]]:
    """Another authsvc replica on the same database, with its own cache and listener, and a stub for it."""
    app = App(replace(settings, **overrides), database_url, listen=f"127.0.0.1:{free_port()}")
    await app.start()
    await asyncio.wait_for(app.feed.connected.wait(), 5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield app, authsvc_pb2_grpc.KeyServiceStub(channel)
    finally:
        await app.stop(grace=0.5)


@asynccontextmanager
async def behind_a_proxy(settings: Settings, database_url: str) -> AsyncIterator[tuple[App, TcpProxy]]:
    """A replica whose database connections go through a ``TcpProxy`` the test can cut or freeze."""
    proxy = TcpProxy.for_database(database_url)
    url = proxy.url_for(database_url)
    app = App(replace(settings, database_url=Secret(url)), url, listen=f"127.0.0.1:{free_port()}")
    try:
        await app.start()
        await asyncio.wait_for(app.feed.connected.wait(), 5)
        yield app, proxy
        await app.stop(grace=0.5)
    finally:
        proxy.close()
