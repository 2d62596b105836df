"""One client process of the client-cache revocation bench: ``python -m bench.clientcache_client FILE TARGET``.

Reads secrets (one per line) from FILE, caches every one of them in an
``AsyncClient`` on TARGET, prints ``ready``, then polls them round robin
until stdin closes, recording each key's first denial (wall clock) and any
allow after it. Prints one JSON line: ``{"first_denial": {index: t}, "allows_after_denial": n, ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from authsvc_client import AsyncClient, Unavailable


async def main(secrets: list[str], target: str) -> None:
    async with AsyncClient(target, timeout=1.0) as client:
        async def warm(secret: str) -> None:
            for _ in range(50):  # a loaded machine may miss the store's 100 ms budget now and then
                try:
                    await client.authorize(secret, "read")
                    return
                except Unavailable:
                    await asyncio.sleep(0.05)

        for secret in secrets:
            await warm(secret)
        for _ in range(3000):  # polled: the client has no event for it
            if client.cache_stats().stream == "subscribed":
                break
            await asyncio.sleep(0.01)
        for secret in secrets:  # now decided locally
            await warm(secret)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        closed = loop.run_in_executor(None, sys.stdin.read)
        first: dict[int, float] = {}
        after = unavailable = polls = 0
        while not closed.done():
            for i, secret in enumerate(secrets):
                try:
                    decision = await client.authorize(secret, "read")
                except Unavailable:
                    unavailable += 1
                    continue
                polls += 1
                if not decision.allowed:
                    first.setdefault(i, time.time())
                elif i in first:
                    after += 1
            await asyncio.sleep(0.001)  # a service between requests: 4 spinning clients would starve the servers
        stats = client.cache_stats()
        print(json.dumps({"first_denial": first, "allows_after_denial": after, "unavailable": unavailable,
                          "polls": polls, "hits": stats.hits, "misses": stats.misses}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]).read_text().split(), sys.argv[2]))
