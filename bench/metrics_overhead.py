"""What metrics cost on the hot path, in one process: cache-hit ``KeyService.authorize`` in a tight loop.

    python -m bench.metrics_overhead [--calls 200000] [--rounds 5]

The real core (catalog, key format, ``KeyCache``, ``decide``), with the key
already cached, so a call is the cache-hit path and nothing else; the store
is a stand-in that is never reached after the first call. Rounds alternate
metrics off (``NO_METRICS``) and on (``Metrics``) so drift from other load on
the machine hits both alike; prints calls per CPU-second per round and the
on/off ratio of the medians as JSON. The whole-server figure (real gRPC, h2load) is the
throughput part of ``bench/run`` with ``--metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime

from authsvc.cache import KeyCache
from authsvc.config import DEFAULT_CATALOG
from authsvc.keyformat import KeyFormat
from authsvc.keys import ApiKey, ScopeCatalog
from authsvc.metrics import NO_METRICS, Metrics, Recorder
from authsvc.service import KeyService


class _OneKeyStore:
    """Answers the one lookup that fills the cache; the loop never reaches it again."""

    def __init__(self, digest: bytes, key: ApiKey) -> None:
        self._digest, self._key = digest, key

    async def find_by_digest(self, digest: bytes) -> ApiKey | None:
        return self._key if digest == self._digest else None


async def _calls_per_second(metrics: Recorder, calls: int) -> float:
    key_format = KeyFormat("authsvc")
    issued = key_format.generate()
    key = ApiKey(
        id="00000000-0000-0000-0000-000000000001",
        org_id="bench",
        name="bench",
        prefix=issued.display_prefix,
        scopes=("read",),
        created_by="bench",
        create_time=datetime.now(UTC),
    )
    cache = KeyCache(1000, freshness=1e9)  # no listener here to keep it fresh
    cache.synchronised()
    service = KeyService(
        _OneKeyStore(issued.digest, key),  # type: ignore[arg-type]  # only the lookup is ever called
        ScopeCatalog.load(DEFAULT_CATALOG),
        key_format,
        cache=cache,
        metrics=metrics,
    )
    secret = issued.secret
    authorize = service.authorize
    assert (await authorize(secret, "read")).allowed
    # CPU time of this process, not wall time: on a shared machine other
    # processes' load then lengthens neither side's figure.
    start = time.process_time()
    for _ in range(calls):
        await authorize(secret, "read")
    return calls / (time.process_time() - start)


def measure(calls: int, rounds: int) -> dict[str, object]:
    off: list[float] = []
    on: list[float] = []
    for _ in range(rounds):
        off.append(asyncio.run(_calls_per_second(NO_METRICS, calls)))
        on.append(asyncio.run(_calls_per_second(Metrics(), calls)))
    ratio = statistics.median(on) / statistics.median(off)
    return {"calls": calls, "off_per_s": off, "on_per_s": on, "on_over_off": round(ratio, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.calls, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
