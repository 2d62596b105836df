"""The client decision cache (issue 12): local decision rate, revocation into client processes, fan-out, memory.

* **rate**: one asyncio process, one known key, ``await client.authorize(key, "read")`` back to back for
  ``duration`` seconds with the cache on, then the same loop with ``cache_size=0``; decisions/s and the ratio.
* **revocation**: 2 replicas (``authsvc serve``, one worker each), 4 client processes
  (``bench/clientcache_client.py``) on replica B, each with every key cached; ``revocations`` keys revoked
  one by one on replica A; latency = RevokeKey's return to the first denial in each client process; allows
  after that first denial are counted (they must be 0).
* **fanout**: ``cache_streams`` WatchDecisions streams (each its own channel, as each client process has)
  on one server, read by this process; keys revoked one by one on that server; latency = from sending
  RevokeKey (the server publishes before it answers) to the invalidation's arrival on each stream, which
  is what a client's cache evicts on (that a client then denies is what *revocation* measures end to
  end). The server's RSS before and after the streams are subscribed. Not 200 AsyncClients polling in
  this one process: then its own polling, and the 200 first-denial calls it makes to the server one
  core's worth of Python at a time, are what gets timed.
* **memory**: bytes per cached key in a client's ``LocalCache`` (tracemalloc), distinct principals.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import grpc
from authsvc_client import AsyncClient, Decision, Principal, Reason
from authsvc_client._localcache import LocalCache
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench.config import BenchConfig
from bench.procs import PYTHON, Processes
from bench.servers import Server, authsvc_env, start_authsvc

ADMIN = pb.Actor(user_id="bench-admin", role=pb.ROLE_ADMIN)
CLIENT_PROCESSES = 4


async def _subscribed(clients: list[AsyncClient], within: float = 30.0) -> None:
    """Until every client's stream has heard a heartbeat (polled: the client has no event for it)."""
    for _ in range(int(within / 0.01)):
        if all(c.cache_stats().stream == "subscribed" for c in clients):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("client streams did not subscribe")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _create(stub: Any, n: int) -> list[pb.CreateKeyResponse]:
    org = f"bench-cc-{uuid.uuid4().hex[:8]}"
    return [
        await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=f"cc{i}", scopes=["read"]), timeout=10)
        for i in range(n)
    ]


async def _rate(target: str, duration: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        (key,) = await _create(pb_grpc.KeyServiceStub(channel), 1)
    out: dict[str, Any] = {}
    for name, size in (("cached", 10_000), ("uncached", 0)):
        async with AsyncClient(target, cache_size=size) as client:
            await client.authorize(key.secret, "read")
            if size:
                await _subscribed([client])
            n, end = 0, time.perf_counter() + duration
            while time.perf_counter() < end:
                for _ in range(100):
                    await client.authorize(key.secret, "read")
                n += 100
            out[f"{name}_per_s"] = n / duration
            out[f"{name}_hits"] = client.cache_stats().hits
    out["ratio"] = out["cached_per_s"] / out["uncached_per_s"]
    return out


async def _revocation(a: Server, b: Server, work: Path, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(a.target) as channel:
        stub = pb_grpc.KeyServiceStub(channel)
        keys = await _create(stub, n)
        secrets = work / "secrets.txt"
        secrets.write_text("\n".join(k.secret for k in keys) + "\n")
        clients = [  # the harness starts them once, before anything is measured
            subprocess.Popen(  # noqa: ASYNC220
                [PYTHON, "-m", "bench.clientcache_client", str(secrets), b.target],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for _ in range(CLIENT_PROCESSES)
        ]
        try:
            for c in clients:
                assert c.stdout is not None and c.stdout.readline().strip() == "ready"
            revoked_at: list[float] = []
            for k in keys:
                await stub.RevokeKey(pb.RevokeKeyRequest(org_id=k.key.org_id, key_id=k.key.id, actor=ADMIN,
                                                         reason="bench"), timeout=10)
                revoked_at.append(time.time())
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            reports = []
            for c in clients:
                out, _ = c.communicate("", timeout=30)
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for c in clients:
                c.kill()
    latencies, never = [], 0
    for rep in reports:
        for i, at in enumerate(revoked_at):
            t = rep["first_denial"].get(str(i))
            if t is None:
                never += 1
            else:
                latencies.append(max(0.0, (t - at) * 1000))
    return {
        "revocations": n, "client_processes": CLIENT_PROCESSES,
        "p50_ms": _percentile(latencies, 0.5), "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None, "never_denied": never,
        "allows_after_denial": sum(r["allows_after_denial"] for r in reports),
        "client_hits": sum(r["hits"] for r in reports), "client_misses": sum(r["misses"] for r in reports),
    }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _fanout(server: Server, streams: int, rounds: int) -> dict[str, Any]:
    """See the module docstring: ``streams`` raw WatchDecisions streams, ``rounds`` revocations."""
    pid = server.pids()[0]
    rss_before = _rss_kib(pid)
    arrivals: list[dict[bytes, float]] = [{} for _ in range(streams)]
    subscribed = [asyncio.Event() for _ in range(streams)]
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(streams)]

    async def follow(i: int) -> None:
        call: Any = pb_grpc.KeyServiceStub(channels[i]).WatchDecisions()
        async for message in call:
            kind = message.WhichOneof("event")
            if kind == "heartbeat":
                subscribed[i].set()
            elif kind == "invalidation":
                now = time.time()
                for digest in message.invalidation.digests:
                    arrivals[i].setdefault(digest, now)

    followers = [asyncio.create_task(follow(i)) for i in range(streams)]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(e.wait() for e in subscribed))
        rss_subscribed = _rss_kib(pid)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.KeyServiceStub(channel)
            keys = await _create(stub, rounds)
            await asyncio.sleep(0.5)
            for seen in arrivals:
                seen.clear()  # the creations published the same digests: only the revocations' count
            revoked: list[tuple[bytes, float]] = []
            for k in keys:
                # From the request, not its return: the server publishes before it answers.
                revoked.append((hashlib.sha256(k.secret.encode()).digest(), time.time()))
                await stub.RevokeKey(pb.RevokeKeyRequest(org_id=k.key.org_id, key_id=k.key.id, actor=ADMIN,
                                                         reason="bench"), timeout=10)
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        rss_after = _rss_kib(pid)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        for c in channels:
            await c.close()
    latencies, never = [], 0
    for seen in arrivals:
        for digest, at in revoked:
            t = seen.get(digest)
            if t is None:
                never += 1
            else:
                latencies.append(max(0.0, (t - at) * 1000))
    return {
        "streams": streams, "revocations": rounds, "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99), "max_ms": max(latencies) if latencies else None,
        "never_denied": never,
        "server_rss_kib": {"before": rss_before, "subscribed": rss_subscribed, "after": rss_after},
    }


def _memory(keys: int) -> dict[str, Any]:
    cache = LocalCache(keys)
    cache.heartbeat()
    secrets = [f"authsvc_{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}" for _ in range(keys)]
    # Traced from here: what decision_from_proto builds for each answer (its own strings), and the entry.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, secret in enumerate(secrets):
        principal = Principal(key_id=str(uuid.uuid4()), org_id=f"org-{i % 100}", user_id=f"user-{i % 1000}",
                              scopes=("read",), key_prefix=secret[:12], key_name=f"key {i}")
        cache.learn(secret, "read", Decision(Reason.OK, principal), None, True, cache.begin())
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert cache.stats().entries == keys
    return {"keys": keys, "bytes_per_key": (after - before) / keys}


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    work = cfg.work_dir / "clientcache"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    with Processes(work / "logs") as procs:
        a = start_authsvc(procs, "cc-replica-A", authsvc_env(cfg.database_url), 1)
        b = start_authsvc(procs, "cc-replica-B", authsvc_env(cfg.database_url), 1)
        result["rate"] = asyncio.run(_rate(b.target, cfg.duration))
        r = result["rate"]
        log(f"  local decisions {r['cached_per_s']:.0f}/s vs {r['uncached_per_s']:.0f}/s uncached = {r['ratio']:.0f}x")
        result["revocation"] = asyncio.run(_revocation(a, b, work, cfg.revocations))
        r = result["revocation"]
        log(f"  revocation into {CLIENT_PROCESSES} client processes: p99 {r['p99_ms']:.1f} ms,"
            f" never denied {r['never_denied']}, allows after denial {r['allows_after_denial']}")
        result["fanout"] = asyncio.run(_fanout(b, cfg.cache_streams, cfg.cache_fanout_revocations))
        r = result["fanout"]
        log(f"  fan-out to {r['streams']} streams: p99 {r['p99_ms']:.1f} ms, server RSS {r['server_rss_kib']} KiB")
    result["memory"] = _memory(cfg.memory_keys_process)
    log(f"  {result['memory']['bytes_per_key']:.0f} bytes per cached key in the client")
    return {"clientcache": result}
