"""Starting the servers under test, all in one topology.

Every server (authsvc, the empty Authorize baseline, the always-OK Check
baseline) runs ``workers`` processes that share one port with SO_REUSEPORT
and also listen one port per worker (``base + i``): h2load uses the shared
port with many connections, Envoy lists the per-worker ports as endpoints.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.procs import PYTHON, Process, Processes, free_port, free_port_range, wait_serving


@dataclass
class Server:
    name: str
    process: Process
    port: int
    worker_ports: list[int] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return self.process.group_pids()

    def worker_pids(self) -> list[int]:
        """The processes that listen on the shared port (not the supervisor, not multiprocessing's helpers)."""
        listening = _socket_pids("-tlnpH", self.port)
        return sorted(set(listening)) or self.pids()


def _socket_pids(flags: str, port: int, state: str | None = None) -> list[int]:
    """One pid per socket on local port ``port``, as ``ss`` reports them."""
    argv = ["ss", flags, *(["state", state] if state else []), f"( sport = :{port} )"]
    out = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout
    pids = []
    for line in out.splitlines():
        marker = line.find("pid=")
        if marker >= 0:
            pids.append(int(line[marker + 4 :].split(",", 1)[0]))
    return pids


def _start(
    procs: Processes, name: str, argv: list[str], env: Mapping[str, str], port: int, worker_ports: list[int]
) -> Server:
    process = procs.start(name, argv, env)
    server = Server(name, process, port, worker_ports)
    for p in [port, *worker_ports]:
        wait_serving(f"127.0.0.1:{p}", process)
    return server


def authsvc_env(database_url: str, **extra: str | int) -> dict[str, str]:
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_LOG_LEVEL": "WARNING",
        "AUTHSVC_MAX_ACTIVE_KEYS": "10000",
        "AUTHSVC_METRICS_LISTEN": "",  # off unless a scenario asks (metrics_listen=...): replicas would share the port
    }
    env.update({f"AUTHSVC_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def start_authsvc(
    procs: Processes, name: str, env: Mapping[str, str], workers: int, prefix: Sequence[str] = ()
) -> Server:
    """``prefix`` goes before the command (``taskset -c 1``: the server's processes on one core)."""
    port = free_port()
    full = {"AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{free_port()}", **env, "AUTHSVC_LISTEN": f"127.0.0.1:{port}"}
    worker_ports: list[int] = []
    if workers > 1:
        base = free_port_range(workers)
        full["AUTHSVC_WORKER_BASE_PORT"] = str(base)
        worker_ports = [base + i for i in range(workers)]
    argv = [*prefix, PYTHON, "-m", "authsvc", "serve", "--workers", str(workers)]
    return _start(procs, name, argv, full, port, worker_ports)


def start_standin(procs: Processes, name: str, module: str, workers: int) -> Server:
    """bench.baseline_server or bench.ok_check_server in the same topology as authsvc."""
    port = free_port()
    argv = [PYTHON, "-m", module, "--listen", f"127.0.0.1:{port}", "--workers", str(workers)]
    worker_ports: list[int] = []
    if workers > 1:
        base = free_port_range(workers)
        argv += ["--base-port", str(base)]
        worker_ports = [base + i for i in range(workers)]
    return _start(procs, name, argv, {}, port, worker_ports)


def connection_split(server: Server) -> dict[int, int]:
    """Established connections on the shared port, per serving process (from ``ss -tnp``)."""
    split: Counter[int] = Counter({pid: 0 for pid in server.worker_pids()})
    split.update(_socket_pids("-tnpH", server.port, "established"))
    return dict(split)
