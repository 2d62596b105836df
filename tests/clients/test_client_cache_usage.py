"""Issue 14 with the client decision cache: calls the client decides itself still count in GetKeyUsage.

The client reports them on WatchDecisions (``calls_by_reason``); the server
feeds them to the same batcher as its own answers, so the total is exact.
"""

from __future__ import annotations

import asyncio

from authsvc_client import AsyncClient
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.runtime import App
from tests.clients.test_client_cache import new_key
from tests.support import MEMBER, Stub, new_org


async def test_calls_decided_in_the_client_are_counted_like_the_servers(app: App, stub: Stub) -> None:
    org = new_org()
    key = await new_key(stub, org)
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        allowed = denied = 0
        # Answered by the server until the client's stream is up and the key is cached; every call counted here.
        for _ in range(200):
            before = client.cache_stats().hits
            assert (await client.authorize(key.secret, "read")).allowed
            allowed += 1
            if client.cache_stats().hits > before:
                break
            await asyncio.sleep(0.05)
        hits = client.cache_stats().hits
        for scope in ["read"] * 10 + ["write"] * 4:
            if (await client.authorize(key.secret, scope)).allowed:
                allowed += 1
            else:
                denied += 1
        assert client.cache_stats().hits >= hits + 10  # decided locally, not by the server
        assert denied == 4
        expected_allowed = allowed

        last = None
        for _ in range(80):  # reports every 2 s, flushes every 0.2 s here
            usage = await stub.GetKeyUsage(pb.GetKeyUsageRequest(org_id=org, key_id=key.key.id, actor=MEMBER, days=1))
            last = usage.days[0]
            if (last.allowed, last.denied) == (expected_allowed, denied):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"usage {last} never reached allowed={expected_allowed} denied={denied}")
