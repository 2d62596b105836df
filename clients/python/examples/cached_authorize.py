"""Decide known keys in this process: ``python cached_authorize.py AUTHSVC_TARGET KEY``.

Authorizes KEY a few times with the client's decision cache (on by default)
and prints each decision and where it was decided, then the cache's stats:

    allowed (authsvc)
    allowed (this process)
    ...
    hits=... misses=... entries=1 stream=subscribed
"""

from __future__ import annotations

import asyncio
import sys

from authsvc_client import AsyncClient


async def main(target: str, key: str) -> int:
    async with AsyncClient(target) as client:  # cache_size=10_000 by default; 0 turns it off
        await client.authorize(key, "read")  # the first call opens the stream to authsvc
        for _ in range(50):  # the stream subscribes within a heartbeat (100 ms)
            if client.cache_stats().stream == "subscribed":
                break
            await asyncio.sleep(0.02)
        for _ in range(3):
            hits = client.cache_stats().hits
            decision = await client.authorize(key, "read")
            where = "this process" if client.cache_stats().hits > hits else "authsvc"
            print(f"{'allowed' if decision.allowed else decision.reason.code} ({where})")
        s = client.cache_stats()
        print(f"hits={s.hits} misses={s.misses} entries={s.entries} stream={s.stream}")
        return 0 if decision.allowed else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
