"""Authorize throughput and serial latency: empty baseline vs cache hit vs cache miss, same client, same topology.

* baseline: ``bench.baseline_server`` (empty handler, same messages).
* hit: authsvc with its cache; every request carries the same valid seed key,
  so after the first request per worker every Authorize is a cache hit.
* hit_metrics: the hit scenario with metrics on (``AUTHSVC_METRICS_LISTEN``);
  ``hit`` has them off, so the pair is the cost of observability.
* miss: authsvc with ``AUTHSVC_CACHE_SIZE=0``; the same request now does the
  full read-through path on every call: pool acquire, point lookup by
  SHA-256 in the 1M-row table, row decode, grant built. h2load can only
  send one body, so the key is the same each time and its index and heap
  pages stay hot in PostgreSQL's buffers; ``bench.unique`` checks with a
  million distinct keys that this does not flatter the miss path.

Scenarios are interleaved run by run (baseline, hit, miss, baseline, ...)
so a slow moment of the shared machine does not land on one scenario only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc

from bench import h2load, scrape
from bench.config import BenchConfig
from bench.procs import Processes, cpu_seconds, free_port
from bench.seed import backend_pids, seed_key
from bench.servers import Server, authsvc_env, connection_split, start_authsvc, start_standin

PATH = "/authsvc.v1.KeyService/Authorize"
SCOPE = "read"


def request_body(key: str) -> bytes:
    return pb.AuthorizeRequest(key=key, required_scope=SCOPE).SerializeToString()


def authorize(target: str, key: str, scope: str = SCOPE, timeout: float = 5.0) -> pb.AuthorizeResponse:
    # A fresh channel per call: on the shared port each may land on another worker.
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply: pb.AuthorizeResponse = pb_grpc.KeyServiceStub(channel).Authorize(
            pb.AuthorizeRequest(key=key, required_scope=scope), timeout=timeout
        )
        return reply


def verify(server: Server, key: str) -> int:
    """Real gRPC calls on every port: the answer must be allowed. Returns the answer's size on the wire."""
    sizes = set()
    for port in [server.port] * 6 + server.worker_ports:
        reply = authorize(f"127.0.0.1:{port}", key)
        if not (reply.allowed and reply.reason == pb.REASON_OK and reply.http_status == 200):
            raise RuntimeError(f"{server.name} on port {port} did not allow the bench key: {reply}")
        sizes.add(len(reply.SerializeToString()))
    if len(sizes) != 1:
        raise RuntimeError(f"{server.name}: answers of different sizes {sizes}; the size check would be unsound")
    return 5 + sizes.pop()


@dataclass
class Sample:
    """One h2load run of one scenario."""

    rps: float
    """Answers per second, whatever they said (h2load's count)."""
    good_rps: float
    """Answers per second that were the verified allowed answer: the number the targets use."""
    good_fraction: float
    done: int
    failed: int
    server_cpu_us: float
    db_cpu_us: float
    split: list[int] = field(default_factory=list)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    bytes_per_answer: float = 0.0
    expected_bytes: int = 0


def measure(
    server: Server, key: str, cfg: BenchConfig, work: Path, *, serial: bool, database_url: str | None
) -> Sample:
    expected = verify(server, key)
    data_file = work / f"authorize-{server.name}.bin"
    data_file.write_bytes(h2load.grpc_frame(request_body(key)))
    pids = server.worker_pids()
    db_pids: list[int] = []
    state: dict[str, Any] = {}

    def during() -> None:
        if database_url is not None:
            db_pids.extend(backend_pids(database_url))
        state["t0"] = time.monotonic()
        state["cpu0"] = cpu_seconds(pids)
        state["db0"] = cpu_seconds(db_pids)
        state["split"] = sorted(connection_split(server).values(), reverse=True)

    if serial:
        result = h2load.run(
            [server.port], PATH, data_file, connections=1, streams=1, duration=cfg.serial_duration,
            warmup=min(1.0, cfg.warmup), log_dir=work, during=during,
        )
    else:
        result = h2load.run(
            [server.port], PATH, data_file, connections=cfg.connections, streams=cfg.streams,
            duration=cfg.duration, warmup=cfg.warmup, during=during,
        )
    elapsed = time.monotonic() - state["t0"]
    served = max(1.0, result.rps * min(elapsed, result.seconds))
    cpu = cpu_seconds(pids) - state["cpu0"]
    db_cpu = cpu_seconds(db_pids) - state["db0"]
    # Every answer must be the verified message: an error answer (UNAVAILABLE
    # when the store budget is exceeded) has no DATA frame at all.
    good = result.data_bytes / expected / result.done if result.done else 0.0
    return Sample(
        rps=result.rps,
        good_rps=result.rps * good,
        good_fraction=good,
        done=result.done,
        failed=result.failed + result.errored + (result.done - result.status_2xx),
        server_cpu_us=cpu / served * 1e6,
        db_cpu_us=db_cpu / served * 1e6,
        split=list(state["split"]),
        p50_ms=result.percentile_ms(0.50),
        p99_ms=result.percentile_ms(0.99),
        bytes_per_answer=result.data_bytes_per_response,
        expected_bytes=expected,
    )


SCENARIOS = ("baseline", "hit", "miss")
LOADED = (*SCENARIOS, "hit_metrics")  # metrics on: throughput only, next to "hit"


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    key = seed_key(0)
    work = cfg.work_dir / "throughput"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"throughput": {s: [] for s in LOADED}, "serial": {s: [] for s in SCENARIOS}}
    metrics_port = free_port()
    with Processes(work / "logs") as procs:
        servers = {
            "baseline": start_standin(procs, "baseline", "bench.baseline_server", cfg.workers),
            "hit": start_authsvc(procs, "authsvc-hit", authsvc_env(cfg.database_url), cfg.workers),
            "miss": start_authsvc(procs, "authsvc-miss", authsvc_env(cfg.database_url, cache_size=0), cfg.workers),
            "hit_metrics": start_authsvc(
                procs,
                "authsvc-hit-metrics",
                authsvc_env(cfg.database_url, metrics_listen=f"127.0.0.1:{metrics_port}"),
                cfg.workers,
            ),
        }
        for i in range(cfg.runs):
            for name in LOADED:
                db = None if name == "baseline" else cfg.database_url
                sample = measure(servers[name], key, cfg, work, serial=False, database_url=db)
                results["throughput"][name].append(sample.__dict__)
                log(f"  run {i + 1}/{cfg.runs} {name:8s} {sample.rps:8.0f} req/s  "
                    f"server {sample.server_cpu_us:5.0f} us/req  db {sample.db_cpu_us:4.0f} us/req  "
                    f"conns/worker {sample.split}  good answers {sample.good_fraction:.2%}")
            for name in SCENARIOS:
                db = None if name == "baseline" else cfg.database_url
                sample = measure(servers[name], key, cfg, work, serial=True, database_url=db)
                results["serial"][name].append(sample.__dict__)
                log(f"  run {i + 1}/{cfg.runs} serial {name:8s} p50 {sample.p50_ms:.3f} ms  "
                    f"p99 {sample.p99_ms:.3f} ms  good answers {sample.good_fraction:.2%}")
        results["metrics_counted"] = scrape.total(metrics_port, "authsvc_authorize_total")
        log(f"  hit_metrics: its /metrics counted {results['metrics_counted']:.0f} Authorize answers (metrics were on)")
    return results

