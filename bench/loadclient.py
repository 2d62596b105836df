"""A Python gRPC client that authorizes *distinct* seed keys (h2load can only repeat one body).

    python -m bench.loadclient --target 127.0.0.1:50051 --start 0 --count 100000 [--duration 5]

Sends seed keys start, start+stride, ... (each once; or one key again and
again with ``--same-key``) with ``concurrency`` calls in
flight over ``connections`` HTTP/2 connections, until ``count`` keys or
``duration`` seconds; prints one JSON line: answers, allowed, errors by
code, seconds. Much slower per request than h2load (it is Python), so it is
used where distinct keys matter, not to find the server's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench.seed import seed_key


async def drive(
    target: str, start: int, count: int, duration: float, concurrency: int, connections: int, stride: int = 1,
    modulo: int = 0, same_key: bool = False,
) -> dict[str, object]:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)
    ]
    stubs = [pb_grpc.KeyServiceStub(c) for c in channels]
    next_index = start
    stop_index = start + count
    allowed = answers = 0
    errors: Counter[str] = Counter()
    began = time.perf_counter()
    deadline = began + duration if duration > 0 else float("inf")

    async def worker(n: int) -> None:
        nonlocal next_index, allowed, answers
        stub = stubs[n % len(stubs)]
        while next_index < stop_index and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            key = seed_key(start if same_key else (start + (index - start) * stride) % (modulo or 1 << 62))
            try:
                reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            answers += 1
            allowed += reply.allowed

    try:
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    finally:
        for c in channels:
            await c.close()
    return {"answers": answers, "allowed": allowed, "errors": dict(errors), "seconds": time.perf_counter() - began,
            "next": next_index}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--stride", type=int, default=1, help="key k is seed key start + k * stride (mod --modulo)")
    parser.add_argument("--modulo", type=int, default=0)
    parser.add_argument("--same-key", action="store_true", help="send seed key --start every time")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(drive(
        args.target, args.start, args.count, args.duration, args.concurrency, args.connections, args.stride,
        args.modulo, args.same_key,
    ))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
