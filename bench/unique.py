"""Does h2load's one repeated key flatter the cache-miss path? Same server, one key vs a million.

authsvc with ``AUTHSVC_CACHE_SIZE=0`` (every Authorize reads PostgreSQL) is
driven by ``bench.loadclient``, once with one key repeated (what h2load
sends) and once with distinct keys spread over the whole 1M-key table
(stride 104729, a prime: consecutive requests land on distant heap pages
and index leaves). The Python client is slower than h2load and shares the 2
cores, so absolute rates are not the server's ceiling; what matters is the
ratio between the two and the CPU each request costs authsvc and
PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from bench.config import BenchConfig
from bench.procs import PYTHON, ROOT, Processes, cpu_seconds
from bench.seed import backend_pids
from bench.servers import Server, authsvc_env, start_authsvc

STRIDE = 104_729


def _drive(cfg: BenchConfig, server: Server, same_key: bool, start: int) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.loadclient", "--target", server.target, "--start", str(start),
            "--count", str(10**9), "--duration", f"{cfg.unique_duration:g}", "--stride", str(STRIDE),
            "--modulo", str(cfg.seed_keys)]
    if same_key:
        argv.append("--same-key")
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(0.5)  # connections up, pool grown
    pids, db = server.worker_pids(), backend_pids(cfg.database_url)
    cpu0, db0, t0 = cpu_seconds(pids), cpu_seconds(db), time.monotonic()
    out = client.communicate(timeout=cfg.unique_duration + 60)[0]
    cpu1, db1, t1 = cpu_seconds(pids), cpu_seconds(db), time.monotonic()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    rps = result["answers"] / result["seconds"]
    served = max(1.0, rps * (t1 - t0))
    return {
        "rps": rps,
        "allowed_fraction": result["allowed"] / max(1, result["answers"] + sum(result["errors"].values())),
        "server_cpu_us": (cpu1 - cpu0) / served * 1e6,
        "db_cpu_us": (db1 - db0) / served * 1e6,
        "errors": result["errors"],
    }


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {"same_key": [], "distinct_keys": []}
    with Processes(cfg.work_dir / "unique" / "logs") as procs:
        server = start_authsvc(procs, "authsvc-nocache", authsvc_env(cfg.database_url, cache_size=0), cfg.workers)
        for i in range(cfg.unique_runs):
            for name, same in (("same_key", True), ("distinct_keys", False)):
                sample = _drive(cfg, server, same, start=(i * 7_777_777) % cfg.seed_keys)
                out[name].append(sample)
                log(f"  run {i + 1}/{cfg.unique_runs} python client, {name:13s} {sample['rps']:6.0f} req/s  "
                    f"authsvc {sample['server_cpu_us']:4.0f} us/req  PostgreSQL {sample['db_cpu_us']:4.0f} us/req  "
                    f"allowed {sample['allowed_fraction']:.2%}")
    return {"unique": out}
