"""Rate-limit accuracy: 2 replicas sharing Redis, clients sending 5x a key's limit.

A key is created with its own limit L (``CreateKeyRequest.rate_limit``) on a
deployment with a short fixed window. The client paces requests evenly at
5 x L per window, alternating between the two replicas, starting on a window
boundary. Each answer is assigned to the window in which it was decided: the
server decides between the client's send and receive times, so an answer
whose send and receive fall in one window belongs to it; the few that
straddle a boundary are counted as ambiguous and left out.

Per window: admitted / L (target <= 1.05), and whether a 429 came while the
window had admitted fewer than 0.9 x L (target: never). A run without Redis
(each process counting locally) is measured too, to show what sharing buys.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import defaultdict
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench.config import BenchConfig
from bench.procs import Processes
from bench.servers import authsvc_env, start_authsvc

ADMIN = pb.Actor(user_id="bench-admin", role=pb.ROLE_ADMIN)


async def _drive(targets: list[str], cfg: BenchConfig) -> dict[str, Any]:
    window = cfg.rate_window_seconds
    limit = cfg.rate_limit
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.KeyServiceStub(c) for c in channels]
    try:
        created = await stubs[0].CreateKey(
            pb.CreateKeyRequest(org_id=f"org-rate-{uuid.uuid4().hex[:8]}", actor=ADMIN, name="rate limit",
                                scopes=["read"], rate_limit=limit),
            timeout=5,
        )
        request = pb.AuthorizeRequest(key=created.secret, required_scope="read")
        for stub in stubs:  # warm the channels and the caches outside the measured windows
            await stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="write"), timeout=5)
        answers: list[tuple[float, float, bool, int]] = []
        errors = 0

        async def call(stub: pb_grpc.KeyServiceStub) -> None:
            nonlocal errors
            sent = time.time()
            try:
                reply = await stub.Authorize(request, timeout=2)  # type: ignore[misc]  # stubs type the sync API
            except grpc.aio.AioRpcError:
                errors += 1
                return
            answers.append((sent, time.time(), reply.allowed, reply.reason))

        rate = 5 * limit / window
        total = int(rate * window * cfg.rate_windows)
        start = (int(time.time() // window) + 1) * window
        await asyncio.sleep(start - time.time())
        loop_start = time.perf_counter()
        tasks = []
        for k in range(total):
            delay = k / rate - (time.perf_counter() - loop_start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(stubs[k % len(stubs)])))
        await asyncio.gather(*tasks)
    finally:
        for c in channels:
            await c.close()

    windows: dict[int, list[tuple[float, bool, int]]] = defaultdict(list)
    ambiguous = 0
    for sent, received, allowed, reason in answers:
        w_sent, w_recv = int(sent // window), int(received // window)
        if w_sent != w_recv:
            ambiguous += 1
            continue
        windows[w_sent].append((received, allowed, reason))
    first, last = int(start // window), int(start // window) + cfg.rate_windows - 1
    per_window = []
    for w in range(first, last + 1):
        entries = sorted(windows.get(w, []))
        admitted = sum(1 for _, allowed, _ in entries if allowed)
        limited = [i for i, (_, allowed, reason) in enumerate(entries) if reason == pb.REASON_RATE_LIMITED]
        admitted_before_first_429 = sum(1 for _, allowed, _ in entries[: limited[0]] if allowed) if limited else None
        per_window.append({
            "sent": len(entries),
            "admitted": admitted,
            "ratio": admitted / limit,
            "rate_limited": len(limited),
            "admitted_before_first_429": admitted_before_first_429,
            "early_429": bool(limited) and admitted < 0.9 * limit,
        })
    return {"limit": limit, "window_s": window, "windows": per_window, "ambiguous": ambiguous, "errors": errors,
            "sent": total}


def _summary(result: dict[str, Any]) -> str:
    ratios = [w["ratio"] for w in result["windows"]]
    early = sum(1 for w in result["windows"] if w["early_429"])
    return (f"admitted/limit max {max(ratios):.3f} median {statistics.median(ratios):.3f}  "
            f"windows with a 429 below 0.9 x limit: {early}  ambiguous {result['ambiguous']}  "
            f"errors {result['errors']}")


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    work = cfg.work_dir / "ratelimit"
    out: dict[str, Any] = {"shared": [], "local": None}
    for shared in (True, False):
        env = authsvc_env(cfg.database_url, rate_limit_window_seconds=cfg.rate_window_seconds)
        if shared:
            env["AUTHSVC_REDIS_URL"] = cfg.redis_url
        with Processes(work / "logs") as procs:
            servers = [start_authsvc(procs, f"rate-{'redis' if shared else 'local'}-{i}", env, 1) for i in range(2)]
            for i in range(cfg.rate_runs if shared else 1):
                result = asyncio.run(_drive([s.target for s in servers], cfg))
                if shared:
                    out["shared"].append(result)
                else:
                    out["local"] = result
                log(f"  {'redis' if shared else 'local (no Redis)'} run {i + 1}: {_summary(result)}")
    return {"ratelimit": out}
