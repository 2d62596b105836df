"""Memory per cached key: RSS delta / cached keys.

1. A real ``authsvc serve`` process (one worker, cache large enough) is
   filled through Authorize with distinct seed keys by ``bench.loadclient``;
   RSS is read before the fill (after a warm-up) and after it (once the
   batched last-used writes have flushed). Proof that the keys are cached:
   re-authorizing a sample of them afterwards costs the process's
   PostgreSQL backends far less CPU than the same keys' first lookups did
   (what remains is the batched ``last_used_time`` UPDATE, which every
   Authorize causes, cached or not).
2. In one process, authsvc's own ``DecisionCache`` is filled with ``KeyGrant``s
   built from 1M real rows (``bench.memory_inprocess``): the same entries
   without the gRPC round trips, which would take minutes for 1M keys on
   2 cores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import asyncpg

from bench.config import BenchConfig
from bench.procs import PYTHON, ROOT, Processes, cpu_seconds, rss_bytes
from bench.revocation import backend_ports
from bench.servers import authsvc_env, start_authsvc


def _loadclient(target: str, start: int, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.loadclient", "--target", target, "--start", str(start), "--count", str(count)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=1800,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def _backend_pids(url: str, pid: int) -> list[int]:
    """PostgreSQL backends serving process ``pid`` (matched by its client ports)."""
    ports = backend_ports(pid)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])", ports)
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


def _db_cpu(cfg: BenchConfig, pid: int, target: str, start: int, count: int) -> tuple[dict[str, Any], float]:
    """Authorize ``count`` keys; also returns the database CPU microseconds that cost per key."""
    backends = asyncio.run(_backend_pids(cfg.database_url, pid))
    cpu0 = cpu_seconds(backends)
    result = _loadclient(target, start, count)
    return result, (cpu_seconds(backends) - cpu0) / max(1, count) * 1e6


def _process(cfg: BenchConfig, log: Any) -> dict[str, Any]:
    n = cfg.memory_keys_process
    first = cfg.seed_keys - n  # keys nobody else uses, so nothing else is cached
    env = authsvc_env(cfg.database_url, cache_size=n + 10_000, last_used_flush_seconds="0.5")
    with Processes(cfg.work_dir / "memory" / "logs") as procs:
        server = start_authsvc(procs, "authsvc-memory", env, 1)
        pid = server.process.pid
        _loadclient(server.target, 0, 2000)  # warm-up: code paths, pools, channels (2000 entries, counted below)
        time.sleep(1.5)
        before = rss_bytes(pid)
        sample = min(5000, n)
        # The first keys alone, to learn what a database lookup costs here.
        head, fill_db_us = _db_cpu(cfg, pid, server.target, first, sample)
        fill = _loadclient(server.target, first + sample, n - sample)
        time.sleep(1.5)  # last-used batch flushed; its dict emptied
        after = rss_bytes(pid)
        again, recheck_db_us = _db_cpu(cfg, pid, server.target, first, sample)
    keys = fill["allowed"] + head["allowed"]
    log(f"  real process: {keys:,} keys cached in {fill['seconds']:.0f} s, RSS {before / 2**20:.1f} -> "
        f"{after / 2**20:.1f} MiB = {(after - before) / max(1, keys):.0f} B/key; "
        f"database CPU per Authorize: {fill_db_us:.0f} us while filling, {recheck_db_us:.0f} us re-authorizing "
        f"{sample} "
        f"of them (cached: only the batched last-used write remains)")
    return {"keys": keys, "rss_before": before, "rss_after": after, "bytes_per_key": (after - before) / max(1, keys),
            "fill_seconds": fill["seconds"] + head["seconds"], "fill_errors": fill["errors"], "recheck_keys": sample,
            "fill_db_cpu_us": fill_db_us, "recheck_db_cpu_us": recheck_db_us, "recheck_allowed": again["allowed"]}


def _inprocess(cfg: BenchConfig, log: Any) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.memory_inprocess", "--database-url", cfg.database_url,
         "--count", str(cfg.memory_keys_inprocess)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=1800,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["bytes_per_key"] = (result["rss_after"] - result["rss_before"]) / max(1, result["entries"])
    log(f"  in-process DecisionCache: {result['entries']:,} entries, {result['bytes_per_key']:.0f} B/key")
    return result


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    return {"memory": {"process": _process(cfg, log), "inprocess": _inprocess(cfg, log)}}
