"""A Python gRPC client process for the overload bench's probes: times every call.

    python -m bench.probeclient --target 127.0.0.1:50051 --mode key --key KEY --duration 5

Modes: ``seed`` (distinct seed keys from ``--start``: valid keys, uncached)
and ``key`` (one ``--key`` again and again: cached after its first call).
The flood of forged keys is ``bench.h2flood``'s, which costs a fraction of
a grpc.aio client's CPU per call. Prints one JSON
line: calls, outcomes (allowed, denied, or the gRPC code), latency
percentiles of every call (answered or refused) in ms, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench.seed import seed_key


async def drive(args: argparse.Namespace) -> dict[str, object]:
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    stubs = [pb_grpc.KeyServiceStub(c) for c in channels]
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    next_seed = args.start
    began = time.perf_counter()
    deadline = began + args.duration

    def next_key() -> str:
        nonlocal next_seed
        if args.mode == "seed":
            next_seed += 1
            return seed_key(next_seed)
        return str(args.key)

    async def worker(n: int) -> None:
        stub = stubs[n % len(stubs)]
        while (start := time.perf_counter()) < deadline:
            key = next_key()
            try:
                reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=5)
                outcome = "allowed" if reply.allowed else "denied"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            latencies.append(time.perf_counter() - start)
            outcomes[outcome] += 1
            if args.pause:
                await asyncio.sleep(args.pause)

    try:
        await asyncio.gather(*(worker(n) for n in range(args.concurrency)))
    finally:
        for c in channels:
            await c.close()
    return summary(latencies, outcomes, time.perf_counter() - began)


def summary(latencies: list[float], outcomes: Counter[str], seconds: float) -> dict[str, object]:
    """The JSON line every overload client prints (``bench.overload`` reads it): calls, outcomes, ms, seconds."""
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    return {"calls": len(ordered), "outcomes": dict(outcomes), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": ordered[-1] * 1000 if ordered else float("nan"), "seconds": seconds}


def print_result(run: Coroutine[Any, Any, dict[str, object]]) -> int:
    """Run a client's ``drive`` on uvloop and print its summary line."""
    import uvloop

    print(json.dumps(uvloop.run(run)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--mode", choices=("seed", "key"), required=True)
    parser.add_argument("--key", help="the key of --mode key")
    parser.add_argument("--start", type=int, default=0, help="--mode seed: the first seed key's index - 1")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each worker sleeps between calls")
    return print_result(drive(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
