"""Through the real Envoy: wrk -> Envoy (ext_authz) -> always-OK Check vs authsvc's Check.

Envoy's route answers with ``direct_response`` (200), so there is no
upstream in the measurement: ext_authz runs before the router, and the
request's whole cost is Envoy plus the Check call. The ext_authz cluster
lists one endpoint per worker process (``base + i``, round robin): Envoy
keeps one HTTP/2 connection per endpoint and worker thread, and with only
the shared port those few connections could all land on one process.

Both servers get identical Envoy configs and identical wrk traffic; the
authsvc run carries a real seed key in ``x-api-key`` (GET needs ``read``),
cached after the first request on each worker.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.procs import Processes, cpu_seconds, free_port, tool, wait_port
from bench.seed import seed_key
from bench.servers import Server, authsvc_env, start_authsvc, start_standin

BODY = "ok from direct_response\n"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def envoy_config(listen_port: int, endpoints: list[int]) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM_TYPE,
                        "stat_prefix": "bench",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "direct_response": {"status": 200, "body": {"inline_string": BODY}}}],
                        }]},
                        "http_filters": [
                            {"name": "envoy.filters.http.ext_authz", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                                "transport_api_version": "V3",
                                "failure_mode_allow": False,
                                "status_on_error": {"code": 503},
                                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.5s"},
                            }},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "authz",
                "type": "STATIC",
                "lb_policy": "ROUND_ROBIN",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }},
                "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                    for p in endpoints
                ]}]},
            }],
        }
    }


def http_get(port: int, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/bench", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - fixed local URL
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_ERRORS = re.compile(r"Socket errors:.*")
_TOTAL = re.compile(r"(\d+) requests in")
_P50 = re.compile(r"^\s+50%\s+([\d.]+)(us|ms|s)", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(port: int, key: str | None, cfg: BenchConfig, duration: float) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{cfg.wrk_connections}", f"-d{duration:g}s", "--latency"]
    if key:
        argv += ["-H", f"x-api-key: {key}"]
    out = subprocess.run([*argv, f"http://127.0.0.1:{port}/bench"], capture_output=True, text=True,
                         timeout=duration + 60, check=True).stdout
    rps, total = _RPS.search(out), _TOTAL.search(out)
    if not rps or not total:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non2xx = _NON2XX.search(out)
    p50 = _P50.search(out)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": bool(_ERRORS.search(out)),
        "p50_ms": float(p50.group(1)) * _UNIT[p50.group(2)] if p50 else float("nan"),
    }


def _verify(name: str, port: int, key: str) -> None:
    status, body = http_get(port, {"x-api-key": key})
    if status != 200 or body != BODY:
        raise RuntimeError(f"envoy -> {name}: a valid key got {status} {body[:200]!r}")
    if name == "authsvc":
        status, body = http_get(port, {})
        if status != 401:
            raise RuntimeError(f"envoy -> authsvc: a request without key got {status}, so ext_authz is not in the path")


def run(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    key = seed_key(1)
    work = cfg.work_dir / "envoy"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"ok_check": [], "authsvc": []}
    with Processes(work / "logs") as procs:
        backends: dict[str, Server] = {
            "ok_check": start_standin(procs, "ok-check", "bench.ok_check_server", cfg.workers),
            "authsvc": start_authsvc(procs, "authsvc-check", authsvc_env(cfg.database_url), cfg.workers),
        }
        envoys = {}
        for name, server in backends.items():
            port = free_port()
            config_path = work / f"envoy-{name}.json"
            config_path.write_text(json.dumps(envoy_config(port, server.worker_ports or [server.port]), indent=1))
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
                wrk(port, key, cfg, cfg.warmup)
                pids = server.worker_pids()
                cpu0, envoy0 = cpu_seconds(pids), cpu_seconds([envoy.pid])
                sample = wrk(port, key, cfg, cfg.duration)
                served = max(1, sample["requests"])
                sample["server_cpu_us"] = (cpu_seconds(pids) - cpu0) / served * 1e6
                sample["envoy_cpu_us"] = (cpu_seconds([envoy.pid]) - envoy0) / served * 1e6
                results[name].append(sample)
                log(f"  run {i + 1}/{cfg.runs} envoy -> {name:8s} {sample['rps']:8.0f} req/s  "
                    f"non-2xx {sample['non_2xx']}  "
                    f"p50 {sample['p50_ms']:.2f} ms  check server {sample['server_cpu_us']:.0f} us/req  "
                    f"envoy {sample['envoy_cpu_us']:.0f} us/req")
    return {"envoy": results}


def _config_sample(path: Path) -> None:
    """Write an example config (what the bench generates) for readers: ``python -m bench.envoy_path FILE``."""
    path.write_text(json.dumps(envoy_config(10000, [10001, 10002]), indent=2) + "\n")


if __name__ == "__main__":
    import sys

    _config_sample(Path(sys.argv[1]))
