"""What one bench run does: durations, repetitions, sizes. ``--quick`` shrinks everything to check the harness."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from bench.seed import DEFAULT_DATABASE_URL

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BenchConfig:
    database_url: str = DEFAULT_DATABASE_URL
    """The bench's own database (created if missing); never a shared one."""
    redis_url: str = "redis://127.0.0.1:6379/14"
    """The bench's own Redis database number (counters are per key and window, so nothing is flushed)."""
    workers: int = os.cpu_count() or 1
    """Processes of every server under test (authsvc and the stand-ins alike)."""
    seed_keys: int = 1_000_000
    runs: int = 5
    """Repetitions of each throughput and latency measurement; RESULTS.md reports the median."""
    duration: float = 8.0
    warmup: float = 2.0
    connections: int = 16
    streams: int = 4
    """16 x 4 = 64 calls in flight: enough to saturate every worker of the baseline, few enough that a
    cache miss's queueing for a pool connection stays inside authsvc's 100 ms store budget."""
    serial_duration: float = 4.0
    unique_duration: float = 5.0
    unique_runs: int = 3
    envoy_concurrency: int = 1
    wrk_connections: int = 32
    revocations: int = 200
    replicas: int = 3
    listener_losses: int = 10
    rate_limit: int = 100
    rate_window_seconds: int = 1
    rate_windows: int = 8
    rate_runs: int = 3
    memory_keys_process: int = 100_000
    cache_streams: int = 200
    """Client streams on one server in the client-cache fan-out part."""
    cache_fanout_revocations: int = 20
    memory_keys_inprocess: int = 1_000_000
    out_dir: Path = BENCH_DIR
    work_dir: Path = BENCH_DIR / ".work"

    def quick(self) -> BenchConfig:
        return replace(
            self, runs=1, duration=2.0, warmup=1.0, serial_duration=2.0, unique_duration=2.0, unique_runs=1,
            revocations=20, listener_losses=3, rate_windows=3, rate_runs=1, memory_keys_process=10_000,
            memory_keys_inprocess=100_000, cache_streams=20, cache_fanout_revocations=5,
        )
