"""``authsvc serve | migrate``: the operator's entry point.

Start-up problems (bad settings, unreachable database, port in use) print
one line naming what to change and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from authsvc import logs
from authsvc.config import Settings, check_listen, worker_addresses
from authsvc.errors import ConfigError, Unavailable

log = logging.getLogger("authsvc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authsvc", description="API-key authorization service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server (KeyService, Envoy Check, health, reflection)")
    serve.add_argument("--listen", help="host:port (default: AUTHSVC_LISTEN or 127.0.0.1:50051)")
    serve.add_argument("--workers", type=int, help="server processes; 0 = one per core (default: AUTHSVC_WORKERS or 0)")
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    health = commands.add_parser("healthcheck", help="exit 0 if the server at --target reports SERVING")
    health.add_argument("--target", help="host:port (default: AUTHSVC_LISTEN, with 0.0.0.0 read as 127.0.0.1)")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return _healthcheck(args.target)

    try:
        settings = Settings.from_env()
        logs.configure(settings.log_level, settings.log_format)
        if args.command == "migrate":
            return _migrate(settings)
        workers = args.workers if args.workers is not None else settings.workers
        if workers < 0 or workers > 64:
            raise ConfigError("--workers must be between 0 and 64")
        listen = args.listen or settings.listen
        if args.listen:
            check_listen(args.listen, "--listen")
        workers = workers or (os.cpu_count() or 1)
        for address in (listen, *worker_addresses(listen, settings.worker_base_port, workers)):
            ensure_can_listen(address)
        if settings.metrics_listen:
            ensure_can_listen(settings.metrics_listen, "AUTHSVC_METRICS_LISTEN")
        settings = dataclasses.replace(settings, workers=workers, listen=listen)
        install_event_loop()
        if workers == 1:
            return asyncio.run(_serve(settings, listen))
        from authsvc import workers as pool

        return pool.run(settings, listen, workers)
    except (ConfigError, Unavailable) as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def ensure_can_listen(address: str, setting: str = "AUTHSVC_LISTEN (or AUTHSVC_WORKER_BASE_PORT)") -> None:
    """Fail before anything starts when a port is taken, in our one line.

    gRPC would find out too, but only after the database is up, and its core
    prints a line of its own first. (A port taken in between still fails
    cleanly in ``App.start``.)
    """
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address} ({exc.strerror or exc}); set {setting}") from None


def _healthcheck(target: str | None) -> int:
    """For container HEALTHCHECKs: no grpc_health_probe binary needed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if target is None:
        try:
            listen = Settings.from_env().listen
        except ConfigError as exc:
            print(f"authsvc: {exc}", file=sys.stderr)
            return 2
        host, _, port = listen.rpartition(":")
        target = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"  # noqa: S104  # reading, not binding
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as exc:
        print(f"authsvc: {target} is not healthy: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _migrate(settings: Settings) -> int:
    from authsvc.app import database_dsn, run_migrations

    applied = asyncio.run(run_migrations(database_dsn(settings)))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'schema already at head'}")
    return 0


def install_event_loop() -> None:
    """uvloop when available: measurably cheaper per RPC than the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(
    settings: Settings,
    listen: str,
    *,
    dsn: str | None = None,
    reuse_port: bool = False,
    worker: int | None = None,
    extra_listen: tuple[str, ...] = (),
    metrics_dir: Path | None = None,
) -> int:
    import gc

    from authsvc.app import App, database_dsn

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        extra_listen = worker_addresses(listen, settings.worker_base_port, 1)
    app = App(
        settings,
        dsn or database_dsn(settings),
        listen=listen,
        extra_listen=extra_listen,
        reuse_port=reuse_port,
        migrate=worker is None,
        metrics_dir=metrics_dir,
        worker=worker or 0,
    )
    await app.start()
    exporter = None
    if worker is None and app.metrics is not None:
        from authsvc.metrics import MetricsServer, live_snapshots

        try:
            exporter = MetricsServer(settings.metrics_listen, live_snapshots(app.metrics, loop))
        except ConfigError:  # the port was taken after ensure_can_listen looked
            await app.stop(grace=0)
            raise
        exporter.start()
    # Everything allocated so far lives as long as the process: keep the
    # collector from re-scanning it, and collect young objects less often.
    # Measured with h2load on one worker, cache hits: +13% throughput.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    extra = {"listen": " ".join((listen, *extra_listen))} | ({"worker": worker} if worker is not None else {})
    if worker is None:
        log.info("effective configuration: %s", " ".join(f"{k}={v}" for k, v in settings.redacted().items()))
    log.info("authsvc serving", extra=extra)
    await stop.wait()
    log.info("shutting down: draining in-flight calls", extra=extra)
    await app.stop(grace=5.0)
    if exporter is not None:
        exporter.stop()
    return 0
