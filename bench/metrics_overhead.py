"""What metrics cost on the hot path, in one process: cache-hit ``Authorizer.check`` in a tight loop.

    python -m bench.metrics_overhead [--calls 200000] [--rounds 5]

The real core (catalog, key format, ``DecisionCache``, ``decide``), with the key
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

from authsvc_client._cache import DecisionCache

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.authorizer import Authorizer
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import ApiKey, Grant
from authsvc.core.ports import Found
from authsvc.metrics import NO_METRICS, Metrics, Recorder


class _OneKeyStore:
    """Answers the one lookup that fills the cache; the loop never reaches it again."""

    def __init__(self, digest: bytes, key: ApiKey) -> None:
        self._digest, self._key = digest, key

    async def find_by_digest(self, digest: bytes) -> Found:
        return Found(self._key if digest == self._digest else None)


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
    cache: DecisionCache[Grant] = DecisionCache(1000, 1e9, time.monotonic)  # no feed here to keep it fresh
    cache.synchronised(time.monotonic())
    authorizer = Authorizer(
        _OneKeyStore(issued.digest, key),  # type: ignore[arg-type]  # only the lookup is ever called
        load_catalog(DEFAULT_CATALOG),
        key_format,
        clock=time.time,
        cache=cache,
        metrics=metrics,
        timer=time.perf_counter,
    )
    secret = issued.secret
    assert (await authorizer.authorize(secret, "read")).allowed
    check = authorizer.check  # what a transport calls on a hit: synchronous
    # CPU time of this process, not wall time: on a shared machine other
    # processes' load then lengthens neither side's figure.
    start = time.process_time()
    for _ in range(calls):
        check(secret, "read")
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
