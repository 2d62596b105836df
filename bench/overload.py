"""Issue 10's overload targets: a forged-key flood, 10x capacity, a hung Redis.

* **flood**: Python flood processes (``bench.floodclient --mode forged``)
  send a new well-formed forged key on every call, each a cache miss and a
  lookup; meanwhile one probe repeats a cached valid key and another sends
  distinct uncached valid seed keys, one call at a time. Compared with the
  same probes on the idle server. h2load cannot send distinct bodies, so the
  flood is Python, and on 2 cores the flood clients share the CPU with the
  server: "full capacity" is whatever the cores give the server then.
* **10x**: h2load measures the cached key's closed-loop capacity (answers/s),
  then offers 10x that rate open-loop (``--rps`` per connection) for the
  run. Every request's time comes from h2load's log; refusals (UNAVAILABLE,
  no DATA frame) are told apart from allows by the DATA bytes received.
  Server RSS is read before and after.
* **redis**: authsvc with a rate limit and Redis behind a TCP hop of the
  bench's own that can hang (accept, read, never answer). Serial h2load
  p99 of a rate-limited cached key with Redis up, then hung (after the
  first failure, which the circuit breaker turns into local counting).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from bench import h2load
from bench.config import BenchConfig
from bench.procs import PYTHON, ROOT, Processes, rss_bytes
from bench.seed import seed_key
from bench.servers import Server, authsvc_env, start_authsvc
from bench.throughput import PATH, authorize, request_body, verify

CACHED = seed_key(0)


def _client(server: Server, mode: str, duration: float, *, concurrency: int = 1, connections: int = 1,
            start: int = 0) -> subprocess.Popen[str]:
    argv = [PYTHON, "-m", "bench.floodclient", "--target", server.target, "--mode", mode, "--duration",
            f"{duration:g}", "--concurrency", str(concurrency), "--connections", str(connections),
            "--key", CACHED, "--start", str(start)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _result(proc: subprocess.Popen[str], duration: float) -> dict[str, Any]:
    out = proc.communicate(timeout=duration + 60)[0]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    calls = max(1, result["calls"])
    result["allowed_fraction"] = result["outcomes"].get("allowed", 0) / calls
    return result


def _flood(cfg: BenchConfig, server: Server, log: Any) -> dict[str, Any]:
    d = cfg.unique_duration
    base = int(time.time() * 1000) % 900_000  # fresh seed keys each run: uncached
    idle = [_client(server, "key", d), _client(server, "seed", d, start=base)]
    idle_cached, idle_uncached = (_result(p, d) for p in idle)
    floods = [_client(server, "forged", d, concurrency=64, connections=4) for _ in range(2)]
    time.sleep(0.5)
    probes = [_client(server, "key", d - 1), _client(server, "seed", d - 1, start=base + 50_000)]
    cached, uncached = (_result(p, d) for p in probes)
    flood = [_result(p, d) for p in floods]
    forged_rps = sum(f["calls"] / f["seconds"] for f in flood)
    out = {"idle_cached": idle_cached, "idle_uncached": idle_uncached, "cached": cached, "uncached": uncached,
           "flood": flood, "forged_rps": forged_rps}
    log(f"  flood {forged_rps:.0f} forged keys/s: cached key {cached['allowed_fraction']:.2%} allowed, "
        f"p99 {cached['p99_ms']:.2f} ms (idle {idle_cached['p99_ms']:.2f}); uncached valid keys "
        f"{uncached['allowed_fraction']:.2%} allowed (idle {idle_uncached['allowed_fraction']:.2%}); flood outcomes "
        f"{[f['outcomes'] for f in flood]}")
    return out


def _tenfold(cfg: BenchConfig, server: Server, log: Any) -> dict[str, Any]:
    work = cfg.work_dir / "overload"
    work.mkdir(parents=True, exist_ok=True)
    body = work / "cached.bin"
    body.write_bytes(h2load.grpc_frame(request_body(CACHED)))
    size = verify(server, CACHED)  # an allow's bytes on the wire, frame header included
    capacity = h2load.run([server.port], PATH, body, connections=cfg.connections, streams=cfg.streams,
                          duration=cfg.duration / 2, warmup=cfg.warmup)
    pids = server.worker_pids()
    rss0 = sum(rss_bytes(p) for p in pids)
    connections = 100
    offered = 10 * capacity.rps
    argv = h2load.command(server.port, PATH, body, connections=connections, streams=1000, duration=cfg.duration,
                          log_file=work / "tenfold.tsv")
    argv.insert(1, f"--rps={max(1, round(offered / connections))}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.duration + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = h2load.parse(proc.stdout)
    times = sorted(int(line.split("\t")[2]) / 1000 for line in (work / "tenfold.tsv").read_text().splitlines()
                   if len(line.split("\t")) >= 3)
    (work / "tenfold.tsv").unlink()
    rss1 = sum(rss_bytes(p) for p in pids)
    allowed = result.data_bytes // size
    out = {"capacity_rps": capacity.rps, "offered_rps": offered, "answered_rps": result.rps, "done": result.done,
           "allowed": allowed, "refused": result.done - allowed, "max_ms": times[-1] if times else float("nan"),
           "p99_ms": times[int(0.99 * len(times))] if times else float("nan"),
           "over_100ms": sum(t > 100 for t in times),
           "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20, "errored": result.errored}
    log(f"  10x: capacity {capacity.rps:.0f}/s, offered {offered:.0f}/s, answered {result.rps:.0f}/s "
        f"({allowed} allowed, {result.done - allowed} refused, {result.errored} errored), max {out['max_ms']:.1f} ms, "
        f"{out['over_100ms']} over 100 ms; RSS {out['rss_before_mb']:.0f} -> {out['rss_after_mb']:.0f} MiB")
    return out


class _HangableHop:
    """TCP to the real Redis; ``hung``: accept and read, answer nothing (bytes swallowed and counted)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.hung, self.swallowed = target, False, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                self._socks += [client, upstream]
                threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.hung:
                    self.swallowed += len(data) if from_client else 0
                    continue
                sink.sendall(data)

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def _redis(cfg: BenchConfig, procs: Processes, log: Any) -> dict[str, Any]:
    parts = urlsplit(cfg.redis_url)
    hop = _HangableHop((parts.hostname or "127.0.0.1", parts.port or 6379))
    try:
        env = authsvc_env(cfg.database_url, rate_limit=10**9, redis_url=f"redis://127.0.0.1:{hop.port}{parts.path}")
        server = start_authsvc(procs, "authsvc-redis", env, cfg.workers)
        work = cfg.work_dir / "overload"
        work.mkdir(parents=True, exist_ok=True)
        body = work / "cached.bin"
        body.write_bytes(h2load.grpc_frame(request_body(CACHED)))
        verify(server, CACHED)

        def serial() -> h2load.LoadResult:
            return h2load.run([server.port], PATH, body, connections=1, streams=1, duration=cfg.serial_duration,
                              warmup=1, log_dir=work)

        up = serial()
        hop.hung = True
        t0 = time.monotonic()
        for port in [server.port] * 4 + server.worker_ports:  # the first failure on every worker
            authorize(f"127.0.0.1:{port}", CACHED)
        first_ms = (time.monotonic() - t0) * 1000
        hung = serial()
        hop.hung = False
        procs.stop(server.process)
    finally:
        hop.close()
    out = {"up_p99_ms": up.percentile_ms(0.99), "hung_p99_ms": hung.percentile_ms(0.99),
           "up_p50_ms": up.percentile_ms(0.5), "hung_p50_ms": hung.percentile_ms(0.5),
           "first_failures_ms": first_ms, "hung_calls": hung.done}
    log(f"  redis: p99 up {out['up_p99_ms']:.2f} ms, hung {out['hung_p99_ms']:.2f} ms "
        f"(p50 {out['up_p50_ms']:.2f} / {out['hung_p50_ms']:.2f}); the first failures took {first_ms:.0f} ms")
    return out


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    with Processes(cfg.work_dir / "overload" / "logs") as procs:
        server = start_authsvc(procs, "authsvc", authsvc_env(cfg.database_url), cfg.workers)
        flood = _flood(cfg, server, log)
        tenfold = _tenfold(cfg, server, log)
        procs.stop(server.process)
        redis = _redis(cfg, procs, log)
    return {"overload": {"flood": flood, "tenfold": tenfold, "redis": redis}}


