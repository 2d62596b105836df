"""Memory per cached key, in one process: authsvc's own ``DecisionCache`` filled with ``KeyGrant``s of real rows.

    python -m bench.memory_inprocess --database-url URL --count 1000000

Reads ``count`` seed rows from api_keys with the store's own row mapping
(``authsvc.storage.postgres._to_key``), builds each entry exactly as
Authorize's read-through does (``KeyGrant.of(key, catalog)``, keyed by the
32-byte digest) and prints RSS before and after as JSON. Rows are read in
batches and dropped, so what remains is the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time

import asyncpg
from authsvc_client._cache import DecisionCache

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.keys import KeyGrant
from authsvc.storage.postgres import _COLUMNS, _to_key
from bench.procs import rss_bytes


async def fill(url: str, count: int) -> dict[str, int]:
    import os

    catalog = load_catalog(DEFAULT_CATALOG)
    cache: DecisionCache[KeyGrant] = DecisionCache(count, 3600.0)
    cache.synchronised(time.monotonic())
    conn = await asyncpg.connect(url, timeout=10)
    try:
        # Warm up the code paths (and asyncpg's codecs) before the "before" reading.
        async with conn.transaction():
            for row in await conn.fetch(f"SELECT {_COLUMNS}, key_hash FROM api_keys LIMIT 1000"):
                KeyGrant.of(_to_key(row), catalog)
        gc.collect()
        before = rss_bytes(os.getpid())
        async with conn.transaction(readonly=True):
            cursor = conn.cursor(
                f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE org_id LIKE 'org-bench-%' LIMIT $1", count,
                prefetch=10_000,
            )
            async for row in cursor:
                cache.put(bytes(row["key_hash"]), KeyGrant.of(_to_key(row), catalog), cache.epoch)
        gc.collect()
        after = rss_bytes(os.getpid())
    finally:
        await conn.close()
    return {"entries": len(cache), "rss_before": before, "rss_after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(fill(args.database_url, args.count))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
