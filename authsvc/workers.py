"""``authsvc serve --workers N``: N server processes on one machine.

Topology. Every worker binds the configured port with SO_REUSEPORT, so the
kernel spreads *connections* across processes. HTTP/2 clients keep few,
long-lived connections (Envoy: about one per Envoy thread), and a connection
stays on the process that accepted it; with few connections the load may
not spread. So with ``AUTHSVC_WORKER_BASE_PORT=P`` each worker i also
listens on its own port P+i: list those as separate endpoints (Envoy cluster,
gRPC ``round_robin`` over ``ipv4:host:P,host:P+1,…``) and the client spreads
requests over every process.

The supervisor starts the embedded database (if used) and runs migrations
once, then only waits. If a worker dies, the supervisor stops the others and
exits non-zero, so the process manager (systemd, Kubernetes) restarts the
whole service rather than running degraded unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.context
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from authsvc.config import Settings, worker_addresses
from authsvc.errors import ConfigError, Unavailable

log = logging.getLogger("authsvc")


def _worker_main(settings: Settings, listen: str, dsn: str, index: int, metrics_dir: Path | None) -> None:
    from authsvc import logs
    from authsvc.cli import _serve, install_event_loop

    logs.configure(settings.log_level, settings.log_format)
    # The supervisor handles Ctrl+C for the group; workers drain on SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_event_loop()
    extra = worker_addresses(listen, settings.worker_base_port, index + 1)[index:]
    try:
        asyncio.run(
            _serve(
                settings, listen, dsn=dsn, reuse_port=True, worker=index, extra_listen=extra, metrics_dir=metrics_dir
            )
        )
    except (ConfigError, Unavailable) as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(2) from None


def run(settings: Settings, listen: str, workers: int) -> int:
    """Supervise ``workers`` processes; the CLI has already checked that every port is free."""
    from authsvc.app import database_dsn, run_migrations

    dsn = database_dsn(settings)
    asyncio.run(run_migrations(dsn))
    log.info("effective configuration: %s", " ".join(f"{k}={v}" for k, v in settings.redacted().items()))
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC threads
    with contextlib.ExitStack() as stack:
        metrics_dir = None
        if settings.metrics_listen:
            from authsvc.metrics import MetricsServer, file_snapshots

            # Private to this run: totals start from zero with the service (see authsvc.metrics).
            metrics_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="authsvc-metrics-")))
            exporter = MetricsServer(settings.metrics_listen, file_snapshots(metrics_dir))
            exporter.start()
            stack.callback(exporter.stop)
        return _supervise(context, settings, listen, dsn, workers, metrics_dir)


def _supervise(
    context: multiprocessing.context.SpawnContext,
    settings: Settings,
    listen: str,
    dsn: str,
    workers: int,
    metrics_dir: Path | None,
) -> int:
    procs: list[BaseProcess] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for index in range(workers):
        proc: BaseProcess = context.Process(
            target=_worker_main, args=(settings, listen, dsn, index, metrics_dir), name=f"authsvc-worker-{index}"
        )
        proc.start()
        procs.append(proc)
    log.info("supervising %d workers", workers, extra={"listen": listen})
    status = 0
    while not stopping:
        time.sleep(0.2)
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            # Exit code 0 means the worker drained after a SIGTERM sent to
            # the whole process group: a requested stop, not a crash.
            if dead[0].exitcode != 0:
                log.error("%s exited with %s; stopping the other workers", dead[0].name, dead[0].exitcode)
                status = 1
            break
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            proc.terminate()  # SIGTERM: each worker drains its in-flight calls
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return status
