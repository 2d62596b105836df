"""Issue 10's overload targets: a forged-key flood, 10x capacity, a hung Redis.

* **flood**: one ``bench.h2flood`` process (raw HTTP/2 frames, a few
  microseconds of Python a call) sends a new well-formed forged key on every
  call, each a cache miss, and a suspect once the server's table of stored
  digests is loaded (well within the idle probes' seconds): looked up within
  its budget, refused past it (``authsvc.core.known``); meanwhile one
  ``bench.probeclient`` repeats a cached valid key and another sends
  distinct uncached valid seed keys, one call at a time. Compared with the
  same probes on the idle server, at growing flood concurrency. h2load
  cannot send distinct bodies, hence a client of our own; it takes 10-22% of
  a core, so the server has nearly all of the two: "full capacity". The **control**: the same floods and
  probes against the empty-handler stand-in (``bench.baseline_server``,
  grpc.aio answering every call at once): the p99 any grpc.aio server gets
  on this machine under that flood.
* **10x**: one authsvc worker on core 1, h2load on core 0 (on a machine of
  two or more cores), so the generator does not take the server's CPU.
  h2load measures the cached key's closed-loop capacity (allowed answers/s),
  then offers 10x, then 5x that rate open-loop (``--rps`` per connection).
  Every request's time comes from h2load's log; allows are counted by the
  server's own metrics before and after each run. Server RSS is read
  before and after. The **control**: the same h2load, the same rates,
  against Envoy on the same core answering every request itself
  (``direct_response``, which Envoy sends a gRPC client as a trailers-only
  reply: less than an allow): what the machine and the generator can carry
  at all. Where the control misses 100 ms too, the target is out of this
  machine's reach, whatever the server does.
* **redis**: authsvc with a rate limit and Redis behind a TCP hop of the
  bench's own that can hang (accept, read, never answer). Serial h2load
  p99 of a rate-limited cached key with Redis up, then hung (after the
  first failure, which the circuit breaker turns into local counting).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import h2load, scrape
from bench.config import BenchConfig
from bench.procs import PYTHON, ROOT, Processes, cpu_seconds, free_port, rss_bytes, tool, wait_port
from bench.seed import seed_key
from bench.servers import Server, authsvc_env, start_authsvc, start_standin
from bench.throughput import PATH, authorize, request_body, verify

CACHED = seed_key(0)


def _client(server: Server, mode: str, duration: float, *, concurrency: int = 1, connections: int = 1,
            start: int = 0) -> subprocess.Popen[str]:
    argv = [PYTHON, "-m", "bench.probeclient", "--target", server.target, "--mode", mode, "--duration",
            f"{duration:g}", "--concurrency", str(concurrency), "--connections", str(connections),
            "--key", CACHED, "--start", str(start)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _result(proc: subprocess.Popen[str], duration: float) -> dict[str, Any]:
    out = proc.communicate(timeout=duration + 60)[0]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    calls = max(1, result["calls"])
    result["allowed_fraction"] = result["outcomes"].get("allowed", 0) / calls
    return result


#: Calls the flood keeps in flight over ``FLOOD_CONNECTIONS``; the last (most forged keys a second) is the target's.
FLOOD_IN_FLIGHT = (8, 32, 128)
FLOOD_CONNECTIONS = 8


def _forged_flood(server: Server, duration: float, in_flight: int) -> subprocess.Popen[str]:
    argv = [PYTHON, "-m", "bench.h2flood", "--target", server.target, "--duration", f"{duration:g}",
            "--connections", str(FLOOD_CONNECTIONS), "--in-flight", str(in_flight // FLOOD_CONNECTIONS)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _flood(cfg: BenchConfig, server: Server, log: Any) -> dict[str, Any]:
    """The probes idle, then under floods of growing concurrency (how the cached key's p99 follows the queue)."""
    d = cfg.unique_duration
    # Fresh seed keys each run (uncached), and every probe's range inside the seeded keys.
    base = int(time.time() * 1000) % (cfg.seed_keys - 50_000 * (len(FLOOD_IN_FLIGHT) + 1))
    idle = [_client(server, "key", d), _client(server, "seed", d, start=base)]
    idle_cached, idle_uncached = (_result(p, d) for p in idle)
    levels: dict[str, dict[str, Any]] = {}
    for n, in_flight in enumerate(FLOOD_IN_FLIGHT):
        flood_process = _forged_flood(server, d, in_flight)
        time.sleep(0.5)
        start = base + 50_000 * (n + 1)
        probes = [_client(server, "key", d - 1), _client(server, "seed", d - 1, start=start)]
        # What the flood costs the server, the database every replica shares and the flood itself.
        servers, databases, flooder = server.pids(), _postgres_pids(), [flood_process.pid]
        began = time.monotonic()
        server_cpu, database_cpu, flood_cpu = cpu_seconds(servers), cpu_seconds(databases), cpu_seconds(flooder)
        cached, uncached = (_result(p, d) for p in probes)
        seconds = time.monotonic() - began
        cpu = {"server_pct": (cpu_seconds(servers) - server_cpu) / seconds * 100,
               "postgres_pct": (cpu_seconds(databases) - database_cpu) / seconds * 100,
               "flood_pct": (cpu_seconds(flooder) - flood_cpu) / seconds * 100}
        flood = _result(flood_process, d)
        forged_rps = flood["calls"] / flood["seconds"]
        levels[str(in_flight)] = {"cached": cached, "uncached": uncached, "flood": flood,
                                  "forged_rps": forged_rps, "cpu": cpu}
        log(f"  flood of {in_flight} in flight, {forged_rps:.0f} forged keys/s (server "
            f"{cpu['server_pct']:.0f}%, PostgreSQL {cpu['postgres_pct']:.0f}%, flood client {cpu['flood_pct']:.0f}% "
            f"of a core): cached key {cached['allowed_fraction']:.2%} allowed, p99 {cached['p99_ms']:.2f} ms (idle "
            f"{idle_cached['p99_ms']:.2f}); uncached valid keys {uncached['allowed_fraction']:.2%} allowed (idle "
            f"{idle_uncached['allowed_fraction']:.2%}); flood outcomes {flood['outcomes']}")
    return {"idle_cached": idle_cached, "idle_uncached": idle_uncached, **levels[str(FLOOD_IN_FLIGHT[-1])],
            "levels": levels}


def _postgres_pids() -> list[int]:
    """Every PostgreSQL process on this machine (the bench's database is the only one running then)."""
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


#: Offered load, as multiples of the closed-loop capacity: the target's 10x, and 5x for where the machine reaches.
MULTIPLES = (10, 5)
#: h2load's open-loop connections (each sends ``--rps`` requests a second).
OPEN_CONNECTIONS = 100


def _pinning() -> tuple[list[str], list[str]]:
    """(server, generator) command prefixes: the second and the first CPU this process may use, or
    nothing with fewer than two (or without ``taskset``)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", str(cpus[1])], ["taskset", "-c", str(cpus[0])]


def _direct_envoy(procs: Processes, work: Path, pin: list[str], size: int) -> tuple[int, int]:
    """Envoy answering every request itself: the control, on the server's core.

    To a gRPC request (``application/grpc``) Envoy turns ``direct_response``
    into a trailers-only reply, without DATA: less work than an allow, so the
    control is an upper bound of what the machine carries.
    """
    port = free_port()
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "x" * size}}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "control", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    config = {"static_resources": {"listeners": [{
        "name": "control", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}
    path = work / "envoy-control.json"
    path.write_text(json.dumps(config, indent=1))
    envoy = procs.start("envoy-control", [*pin, tool("envoy"), "-c", str(path), "--concurrency", "1",
                                          "--log-level", "warn", "--base-id", str(port)])
    wait_port(port, envoy)
    return port, envoy.pid


def _settle(pids: list[int], timeout: float = 20.0) -> float:
    """Wait until ``pids`` use under 10% of a core (a backlog of the last run drained); the seconds waited.

    The server and the control share one core: what one still works through
    after its run would otherwise be charged to the next run on that core.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pids)
        time.sleep(0.5)
        if cpu_seconds(pids) - before < 0.05:
            break
    return time.monotonic() - start


def _allowed(metrics_port: int | None) -> int:
    """authsvc's own count of allowed Authorize answers (every transport); 0 for the control."""
    if metrics_port is None:
        return 0
    return round(sum(s.value for s in scrape.samples(metrics_port)
                     if s.name == "authsvc_authorize_total" and s.labels.get("reason") == "ok"))


def _open_loop(port: int, body: Path, rate: float, duration: float, work: Path, pin: list[str],
               metrics_port: int | None) -> dict[str, Any]:
    """``rate`` requests/s offered open-loop for ``duration``: answers, allows, times.

    Allows are counted by the server (``metrics_port``), not from h2load's
    DATA bytes: grpc.aio sends a refusal as a DATA frame of the 5-byte prefix
    alone, and gRPC core's refusals send none, so bytes cannot tell them apart.
    """
    log_file = work / f"open-{port}.tsv"
    log_file.unlink(missing_ok=True)
    allowed_before = _allowed(metrics_port)
    argv = [*pin, *h2load.command(port, PATH, body, connections=OPEN_CONNECTIONS, streams=1000, duration=duration,
                                  log_file=log_file, rps=max(1, round(rate / OPEN_CONNECTIONS)))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = h2load.parse(proc.stdout)
    times = sorted(int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines()
                   if len(line.split("\t")) >= 3)
    log_file.unlink()
    # Read at once: calls the server still answers after h2load has gone were never seen by it. A few
    # answered as it stopped may be counted still (3,702 here against 3,698 by bytes, once).
    allowed = min(result.done, _allowed(metrics_port) - allowed_before)
    return {"offered_rps": rate, "answered_rps": result.rps, "done": result.done, "allowed": allowed,
            "refused": result.done - allowed, "errored": result.errored,
            "p99_ms": times[int(0.99 * len(times))] if times else float("nan"),
            "max_ms": times[-1] if times else float("nan"), "over_100ms": sum(t > 100 for t in times)}


def _steady_size(server: Server, timeout: float = 15.0) -> int:
    """An allow's bytes on the wire (``verify``), once they no longer change.

    Right after a start the decision cache may not serve yet (the feed's
    first heartbeat), and an answer it did not keep carries no client-cache
    view: two bytes fewer than the hits that follow.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return verify(server, CACHED)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _tenfold(cfg: BenchConfig, procs: Processes, log: Any) -> dict[str, Any]:
    work = cfg.work_dir / "overload"
    work.mkdir(parents=True, exist_ok=True)
    server_pin, generator_pin = _pinning()
    metrics_port = free_port()
    env = authsvc_env(cfg.database_url, metrics_listen=f"127.0.0.1:{metrics_port}")
    server = start_authsvc(procs, "authsvc-tenfold", env, 1, prefix=server_pin)
    body = work / "cached.bin"
    body.write_bytes(h2load.grpc_frame(request_body(CACHED)))
    size = _steady_size(server)

    def closed_loop(duration: float) -> h2load.LoadResult:
        return h2load.run([server.port], PATH, body, connections=cfg.connections, streams=cfg.streams,
                          duration=duration, warmup=0, prefix=generator_pin)

    closed_loop(cfg.warmup)
    allowed_before = _allowed(metrics_port)
    capacity = closed_loop(cfg.duration / 2)
    capacity_rps = (_allowed(metrics_port) - allowed_before) / capacity.seconds  # a refusal is not capacity
    control_port, control_pid = _direct_envoy(procs, work, server_pin, size)  # as many DATA bytes as an allow
    pids = server.worker_pids()
    rss0 = sum(rss_bytes(p) for p in pids)
    runs: dict[str, dict[str, Any]] = {}
    for multiple in MULTIPLES:
        rate = multiple * capacity_rps
        _settle([*pids, control_pid])
        authsvc = _open_loop(server.port, body, rate, cfg.duration, work, generator_pin, metrics_port)
        if multiple == MULTIPLES[0]:
            rss1 = sum(rss_bytes(p) for p in pids)
        _settle([*pids, control_pid])
        control = _open_loop(control_port, body, rate, cfg.duration, work, generator_pin, None)
        runs[str(multiple)] = {"authsvc": authsvc, "control": control}
        log(f"  {multiple}x: capacity {capacity_rps:.0f}/s, offered {rate:.0f}/s: authsvc answered "
            f"{authsvc['answered_rps']:.0f}/s ({authsvc['allowed']} allowed, {authsvc['refused']} refused, "
            f"{authsvc['errored']} errored), p99 {authsvc['p99_ms']:.1f} ms, max {authsvc['max_ms']:.1f} ms, "
            f"{authsvc['over_100ms']} over 100 ms; control p99 {control['p99_ms']:.1f} ms, "
            f"max {control['max_ms']:.1f} ms, {control['over_100ms']} over 100 ms")
    procs.stop(server.process)
    log(f"  RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB over the 10x run; pinned: {bool(server_pin)}")
    return {"capacity_rps": capacity_rps, "workers": 1, "pinned": bool(server_pin), "runs": runs,
            "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20}


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
        procs.stop(server.process)
        log("  the same floods against the empty-handler stand-in (the control):")
        standin = start_standin(procs, "baseline-flood", "bench.baseline_server", cfg.workers)
        flood["control"] = _flood(cfg, standin, log)
        procs.stop(standin.process)
        tenfold = _tenfold(cfg, procs, log)
        redis = _redis(cfg, procs, log)
    return {"overload": {"flood": flood, "tenfold": tenfold, "redis": redis}}


