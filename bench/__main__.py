"""``python -m bench`` (or ``bench/run``): run the benchmark, write RESULTS.md, results.svg, results.json.

    bench/run                      the full run (about 10 minutes on 2 cores)
    bench/run --quick              seconds-long runs, to check the harness; writes to bench/.work/quick/
    bench/run --only envoy,memory  some parts only (results of the others are not kept)
    bench/run --report-only        rewrite RESULTS.md and results.svg from results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import (
    clientcache,
    envoy_http,
    envoy_path,
    machine,
    memory,
    overload,
    ratelimit_accuracy,
    report,
    revocation,
    seed,
    throughput,
    unique,
)
from bench.config import BenchConfig

PARTS: dict[str, Callable[[BenchConfig, Any], dict[str, Any]]] = {
    "throughput": throughput.run,
    "unique": unique.run,
    "envoy": envoy_path.run,
    "envoy_http": envoy_http.run,
    "revocation": revocation.run,
    "ratelimit": ratelimit_accuracy.run,
    "memory": memory.run,
    "clientcache": clientcache.run,
    "overload": overload.run,
}


def log(message: str) -> None:
    print(message, flush=True)


def _stop(signum: int, frame: FrameType | None) -> None:
    # Unwind through every Processes block so no server outlives the bench.
    raise SystemExit(128 + signum)


def write(results: dict[str, Any], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "RESULTS.md").write_text(report.markdown(results, command))
    (out_dir / "results.svg").write_text(report.svg(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs to check the harness (not for the record)")
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--runs", type=int, help="repetitions of each throughput/latency measurement")
    parser.add_argument("--duration", type=float, help="seconds per measured load run")
    parser.add_argument("--workers", type=int, help="processes per server (default: one per core)")
    parser.add_argument("--database-url", help=f"the bench's own database (default {seed.DEFAULT_DATABASE_URL})")
    parser.add_argument("--out", type=Path, help="output folder (default bench/; with --quick bench/.work/quick)")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md, results.svg from results.json")
    args = parser.parse_args(argv)

    cfg = BenchConfig()
    if args.quick:
        cfg = cfg.quick()
    overrides = {k: v for k, v in (("runs", args.runs), ("duration", args.duration), ("workers", args.workers),
                                   ("database_url", args.database_url)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    out_dir = args.out or (cfg.work_dir / "quick" if args.quick else cfg.out_dir)
    command = "bench/run " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        write(json.loads((out_dir / "results.json").read_text()), out_dir, command.strip())
        return 0
    parts = args.only.split(",") if args.only else list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine.describe(cfg.database_url),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "timings": {},
    }
    log(f"bench database {cfg.database_url}: migrating and seeding {cfg.seed_keys:,} keys")
    took = seed.prepare(cfg.database_url, cfg.seed_keys)
    log(f"  seeded in {took:.0f} s" if took else "  seed keys already present")
    results["seed"] = {"seconds": took, **seed.table_sizes(cfg.database_url)}
    for part in parts:
        log(f"{part}:")
        t0 = time.monotonic()
        results.update(PARTS[part](cfg, log))
        results["timings"][part] = time.monotonic() - t0
    results["seconds"] = time.monotonic() - started
    write(results, out_dir, command.strip())
    log(f"wrote {out_dir / 'RESULTS.md'} and results.svg in {results['seconds']:.0f} s")
    for target, ok, numbers in report.targets(results):
        log(f"  {'PASS' if ok else 'FAIL'}  {target}: {numbers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
