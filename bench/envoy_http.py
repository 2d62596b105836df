"""Through the real Envoy in HTTP mode: authsvc's HTTP listener vs the always-OK HTTP and gRPC stand-ins.

Issue 11's targets, in one run on one machine with one Envoy build:

- *authsvc_http*: Envoy's ext_authz ``http_service`` -> ``authsvc serve``'s
  HTTP listener, a real seed key in ``x-api-key`` (cached after its first
  request on each worker);
- *ok_http*: the same Envoy config -> ``bench.ok_http_server``, always 200,
  on the same HTTP server stack (``authsvc.http_server``);
- *ok_check*: Envoy's ``grpc_service`` -> ``bench.ok_check_server``, the
  always-OK gRPC Check of ``bench/envoy_path.py`` (per-worker endpoints).

As in ``envoy_path``, the route is a ``direct_response`` 200: the request
costs Envoy plus one check. HTTP mode lists the one shared port: Envoy's
HTTP/1.1 pool opens a connection per check in flight and SO_REUSEPORT
spreads them (the split is read from ``ss`` halfway through each run). Every answer is checked:
wrk's non-2xx count, and before and after each run a sample of bodies
(the direct response for a key, 401 without one for authsvc). Serial p50
comes from wrk with one connection.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

from bench import envoy_path
from bench.config import BenchConfig
from bench.procs import PYTHON, Process, Processes, cpu_seconds, free_port, tool, wait_port
from bench.seed import seed_key
from bench.servers import Server, _socket_pids, authsvc_env, connection_split, start_authsvc, start_standin

HCM_TYPE = envoy_path.HCM_TYPE
EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
SAMPLES = 5  # bodies checked before and after every measured run


def http_envoy_config(listen_port: int, authz_port: int) -> dict[str, Any]:
    """``envoy_path``'s listener with ext_authz in HTTP mode, set up as ``deploy/envoy/envoy.yaml`` does."""
    config = envoy_path.envoy_config(listen_port, [authz_port])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0] = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": EXT_AUTHZ_TYPE,
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "0.5s"},
                "path_prefix": "/check",
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [{"prefix": "x-authsvc-"}]},
                    "allowed_client_headers": {
                        "patterns": [{"exact": "content-type"}, {"exact": "www-authenticate"}]
                    },
                },
            },
            "allowed_headers": {"patterns": [{"exact": "x-api-key"}, {"prefix": "x-authsvc-"}]},
            "disallowed_headers": {"patterns": [{"exact": "x-authsvc-required-scope"}, {"exact": "x-authsvc-public"}]},
        },
    }
    cluster = config["static_resources"]["clusters"][0]
    cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"
    ] = {"http_protocol_options": {}}
    return config


def _wait_listeners(port: int, count: int, process: Process, timeout: float = 30.0) -> None:
    """Until ``count`` processes listen on ``port``: every worker, not just the first one up."""
    wait_port(port, process, timeout)
    deadline = time.monotonic() + timeout
    while len(set(_socket_pids("-tlnpH", port))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name}: fewer than {count} processes listen on {port}")
        time.sleep(0.1)


def _verify(name: str, port: int, key: str) -> None:
    """A sample of answers, checked by status and body: none may be wrong."""
    for _ in range(SAMPLES):
        status, body = envoy_path.http_get(port, {"x-api-key": key})
        if status != 200 or body != envoy_path.BODY:
            raise RuntimeError(f"envoy -> {name}: a valid key got {status} {body[:200]!r}")
    if name == "authsvc_http":
        status, body = envoy_path.http_get(port, {})
        if status != 401 or json.loads(body)["error"]["code"] != "missing_key":
            raise RuntimeError(f"envoy -> authsvc: a request without key got {status} {body[:200]!r}")


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    key = seed_key(1)
    work = cfg.work_dir / "envoy_http"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"authsvc_http": [], "ok_http": [], "ok_check": []}
    with Processes(work / "logs") as procs:
        authsvc_port = free_port()
        authsvc = start_authsvc(
            procs,
            "authsvc-http",
            authsvc_env(cfg.database_url, http_authz_listen=f"127.0.0.1:{authsvc_port}"),
            cfg.workers,
        )
        _wait_listeners(authsvc_port, cfg.workers, authsvc.process)
        ok_port = free_port()
        ok_process = procs.start(
            "ok-http", [PYTHON, "-m", "bench.ok_http_server", "--listen", f"127.0.0.1:{ok_port}",
                        "--workers", str(cfg.workers)]
        )
        _wait_listeners(ok_port, cfg.workers, ok_process)
        ok_check = start_standin(procs, "ok-check", "bench.ok_check_server", cfg.workers)
        # Where each Envoy sends its checks, and whose CPU that costs.
        backends: dict[str, Server] = {
            "authsvc_http": Server("authsvc-http", authsvc.process, authsvc_port),
            "ok_http": Server("ok-http", ok_process, ok_port),
            "ok_check": ok_check,
        }
        envoys: dict[str, tuple[int, Process]] = {}
        for name, server in backends.items():
            port = free_port()
            if name == "ok_check":
                config = envoy_path.envoy_config(port, server.worker_ports or [server.port])
            else:
                config = http_envoy_config(port, server.port)
            config_path = work / f"envoy-{name}.json"
            config_path.write_text(json.dumps(config, indent=1))
            envoy = procs.start(
                f"envoy-{name}",
                [tool("envoy"), "-c", str(config_path), "--concurrency", str(cfg.envoy_concurrency),
                 "--log-level", "warn", "--base-id", str(port)],
            )
            wait_port(port, envoy)
            envoys[name] = (port, envoy)
        for i in range(cfg.runs):
            for name, server in backends.items():
                port, envoy = envoys[name]
                _verify(name, port, key)
                envoy_path.wrk(port, key, cfg, cfg.warmup)
                pids = server.worker_pids()
                cpu0, envoy0 = cpu_seconds(pids), cpu_seconds([envoy.pid])
                split: dict[str, int] = {}
                if name != "ok_check":
                    # Read mid-run: when wrk stops, Envoy closes the connections whose checks it cancels.
                    timer = threading.Timer(cfg.duration / 2, _record_split, (server, split))
                    timer.start()
                sample = envoy_path.wrk(port, key, cfg, cfg.duration)
                served = max(1, sample["requests"])
                sample["server_cpu_us"] = (cpu_seconds(pids) - cpu0) / served * 1e6
                sample["envoy_cpu_us"] = (cpu_seconds([envoy.pid]) - envoy0) / served * 1e6
                if name != "ok_check":
                    timer.join()
                    sample["connections"] = split
                _verify(name, port, key)
                serial = envoy_path.wrk(port, key, _one_connection(cfg), cfg.serial_duration)
                sample["serial_p50_ms"] = serial["p50_ms"]
                sample["serial_non_2xx"] = serial["non_2xx"]
                results[name].append(sample)
                log(f"  run {i + 1}/{cfg.runs} envoy -> {name:12s} {sample['rps']:8.0f} req/s  "
                    f"non-2xx {sample['non_2xx']}+{serial['non_2xx']}  serial p50 {serial['p50_ms']:.3f} ms  "
                    f"check server {sample['server_cpu_us']:.0f} us/req  envoy {sample['envoy_cpu_us']:.0f} us/req"
                    + (f"  connections {sorted(sample['connections'].values())}" if "connections" in sample else ""))
    return {"envoy_http": results}


def _record_split(server: Server, into: dict[str, int]) -> None:
    into.update({str(pid): count for pid, count in connection_split(server).items()})


def _one_connection(cfg: BenchConfig) -> BenchConfig:
    return dataclasses.replace(cfg, wrk_connections=1)


def _config_sample(path: Path) -> None:
    """Write an example config (what the bench generates) for readers: ``python -m bench.envoy_http FILE``."""
    path.write_text(json.dumps(http_envoy_config(10000, 10001), indent=2) + "\n")


if __name__ == "__main__":
    import sys

    _config_sample(Path(sys.argv[1]))
