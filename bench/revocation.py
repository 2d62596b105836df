"""Revocation propagation: revoke on one replica, time until the others deny.

Replicas are separate ``authsvc serve`` processes (one worker each) on
their own ports and one database, as separate machines would be. For each
key: create it on replica A, authorize it on every other replica (now cached
there), revoke it on A, and from the moment RevokeKey returns poll Authorize
on every other replica back to back until it answers REVOKED. The latency is
RevokeKey's return to the first denial on that replica. Polling goes on to
60 ms after the revoke, so an allow after the 50 ms bound (or after a first
denial) is counted.

Listener loss: before a revoke, every PostgreSQL backend of replica B (the
LISTEN connection and the pool) is terminated with ``pg_terminate_backend``,
then the key is revoked on A while B reconnects; B is polled for 2 s and
must never allow the key (UNAVAILABLE while it reconnects is fine: fail
closed).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from typing import Any

import asyncpg
import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench import scrape
from bench.config import BenchConfig
from bench.procs import Processes, free_port
from bench.servers import Server, authsvc_env, start_authsvc

ADMIN = pb.Actor(user_id="bench-admin", role=pb.ROLE_ADMIN)
BOUND_S = 0.050
WATCH_S = 0.060


class Replica:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.channel = grpc.aio.insecure_channel(server.target)
        self.stub = pb_grpc.KeyServiceStub(self.channel)

    async def authorize(self, secret: str) -> pb.AuthorizeResponse:
        reply: pb.AuthorizeResponse = await self.stub.Authorize(
            pb.AuthorizeRequest(key=secret, required_scope="read"), timeout=2
        )
        return reply


async def _watch(replica: Replica, secret: str, revoked_at: float, watch: float) -> dict[str, Any]:
    """Poll until ``watch`` seconds after the revoke; the first REVOKED answer's delay and any late allow."""
    first_denial: float | None = None
    late_allows = allows_after_denial = unavailable = polls = 0
    while True:
        try:
            reply = await replica.authorize(secret)
            now = time.perf_counter()
            polls += 1
            if reply.allowed:
                if now - revoked_at > BOUND_S:
                    late_allows += 1
                if first_denial is not None:
                    allows_after_denial += 1
            elif reply.reason == pb.REASON_REVOKED and first_denial is None:
                first_denial = now - revoked_at
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            unavailable += 1
            now = time.perf_counter()
        if now - revoked_at >= watch and first_denial is not None:
            break
        if now - revoked_at > 5.0:
            break
    return {
        "latency_ms": first_denial * 1000 if first_denial is not None else None,
        "late_allows": late_allows,
        "allows_after_denial": allows_after_denial,
        "unavailable": unavailable,
        "polls": polls,
    }


async def _one(a: Replica, others: list[Replica], org: str, i: int, before_revoke: Any = None,
               watch: float = WATCH_S) -> list[dict[str, Any]]:
    created = await a.stub.CreateKey(
        pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=f"revocation {i}", scopes=["read"]), timeout=5
    )
    for replica in others:
        for _ in range(2):
            reply = await replica.authorize(created.secret)
            if not reply.allowed:
                raise RuntimeError(f"fresh key not allowed on {replica.server.name}: {reply}")
    if before_revoke is not None:
        await before_revoke()
    await a.stub.RevokeKey(
        pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN, reason="bench"), timeout=5
    )
    revoked_at = time.perf_counter()
    return list(await asyncio.gather(*(_watch(r, created.secret, revoked_at, watch) for r in others)))


def backend_ports(pid: int) -> list[int]:
    """Local ports of ``pid``'s connections to PostgreSQL."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", "( dport = :5432 )"], capture_output=True, text=True, check=False
    ).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[2]
            ports.append(int(local.rpartition(":")[2]))
    return ports


async def _terminate_backends(database_url: str, pid: int) -> int:
    ports = backend_ports(pid)
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = ANY($1::int[]) "
            "AND pid <> pg_backend_pid()",
            ports,
        )
        return sum(1 for r in rows if r[0])
    finally:
        await conn.close()


async def _run(cfg: BenchConfig, servers: list[Server], log: Any, metrics_ports: list[int]) -> dict[str, Any]:
    replicas = [Replica(s) for s in servers]
    a, others = replicas[0], replicas[1:]
    org = f"org-revoke-{uuid.uuid4().hex[:8]}"
    samples: list[dict[str, Any]] = []
    # authsvc's own figure, from the other replicas' /metrics over the same
    # rounds: commit to eviction of every change (each round's create and revoke).
    before = [scrape.histogram(port) for port in metrics_ports[1:]]
    try:
        for i in range(cfg.revocations):
            samples += await _one(a, others, org, i)
            if (i + 1) % 50 == 0:
                log(f"  {i + 1}/{cfg.revocations} revocations")
        lag: scrape.Buckets = {}
        for port, start in zip(metrics_ports[1:], before, strict=True):
            lag = scrape.plus(lag, scrape.minus(scrape.histogram(port), start))
        losses: list[dict[str, Any]] = []
        b = others[0]
        terminated = 0
        for i in range(cfg.listener_losses):
            async def cut() -> None:
                nonlocal terminated
                terminated += await _terminate_backends(cfg.database_url, b.server.process.pid)

            losses += (await _one(a, [b], org, 10_000 + i, before_revoke=cut, watch=2.0))
        log(f"  listener loss: {cfg.listener_losses} rounds, {terminated} backends of replica B terminated")
    finally:
        for r in replicas:
            await r.channel.close()
    server_lag = {
        "observations": lag.get(float("inf"), 0.0),
        "p50_ms": scrape.quantile(lag, 0.5) * 1000,
        "p99_ms": scrape.quantile(lag, 0.99) * 1000,
    }
    return {
        "samples": samples,
        "losses": losses,
        "replicas": len(servers),
        "terminated_backends": terminated,
        "server_lag": server_lag,
    }


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    work = cfg.work_dir / "revocation"
    with Processes(work / "logs") as procs:
        ports = [free_port() for _ in range(cfg.replicas)]
        servers = [
            start_authsvc(
                procs, f"replica-{chr(65 + i)}", authsvc_env(cfg.database_url, metrics_listen=f"127.0.0.1:{p}"), 1
            )
            for i, p in enumerate(ports)
        ]
        result = asyncio.run(_run(cfg, servers, log, ports))
    lat = sorted(s["latency_ms"] for s in result["samples"] if s["latency_ms"] is not None)
    if lat:
        log(f"  revocation p50 {lat[len(lat) // 2]:.2f} ms  p99 {lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.2f} ms"
            f"  max {lat[-1]:.2f} ms  late allows {sum(s['late_allows'] for s in result['samples'])}"
            f"  listener-loss allows {sum(s['late_allows'] + s['allows_after_denial'] for s in result['losses'])}")
        lag = result["server_lag"]
        log(f"  authsvc_invalidation_lag_seconds (commit to eviction, {lag['observations']:.0f} observations): "
            f"p50 {lag['p50_ms']:.2f} ms  p99 {lag['p99_ms']:.2f} ms; client-side p50 {lat[len(lat) // 2]:.2f} ms")
    return {"revocation": result}
