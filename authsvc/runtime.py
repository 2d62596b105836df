"""Running authsvc: one process (``App``), or a supervisor and N worker processes.

``authsvc serve`` (``authsvc.cli``) calls ``serve``, which runs one ``App``
in this process, or supervises ``settings.workers`` worker processes that
each run one. An ``App`` wires the core (``Authorizer``, ``KeyManager``) to
its edges (the PostgreSQL store and feed, Redis, the gRPC server with the
KeyService and Envoy Check adapters), and starts and stops them in order.

Workers. Every worker binds the configured port with SO_REUSEPORT, so the
kernel spreads *connections* across processes. HTTP/2 clients keep few,
long-lived connections (Envoy: about one per Envoy thread), and a connection
stays on the process that accepted it; with few connections the load may
not spread. So with ``AUTHSVC_WORKER_BASE_PORT=P`` each worker i also
listens on its own port P+i: list those as separate endpoints (Envoy cluster,
gRPC ``round_robin`` over ``ipv4:host:P,host:P+1,…``) and the client spreads
requests over every process. The supervisor starts the embedded database (if
used) and runs migrations once, then only waits. If a worker dies, the
supervisor stops the others and exits non-zero, so the process manager
(systemd, Kubernetes) restarts the whole service rather than running
degraded unnoticed.

Start-up errors from the drivers are named after the setting that fed them
here, in ``_setting``; the CLI prints them as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

import asyncpg
from authsvc_client._cache import DecisionCache
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from authsvc import extauthz, extauthz_http, logs
from authsvc.config import Settings
from authsvc.core.admission import Admission
from authsvc.core.authorizer import Authorizer
from authsvc.core.errors import ConfigError, Unavailable
from authsvc.core.fanout import Fanout
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Grant
from authsvc.core.known import KnownDigests
from authsvc.core.manager import LEAK_REPORTS_PER_MINUTE, KeyManager
from authsvc.core.ports import NO_METRICS, Recorder
from authsvc.core.ratelimit import RateLimiter
from authsvc.core.usage import UsageRecorder
from authsvc.fdlimit import connection_cap, raise_open_file_limit
from authsvc.grpc.keyservice import KeyServiceAdapter
from authsvc.grpc.server import (
    KEY_SERVICE,
    MANAGEMENT_METHODS,
    AdminTokens,
    ConnectionLimits,
    build_server,
    service_handler,
)
from authsvc.grpc.tls import ReloadingCredentials
from authsvc.grpc.watch import WatchAdapter
from authsvc.http_server import HttpServer, Limits
from authsvc.metrics import Metrics, MetricsServer, file_snapshots, flush_forever, live_snapshots, write_snapshot
from authsvc.storage import audit, embedded
from authsvc.storage.notify import FRESHNESS, PostgresFeed
from authsvc.storage.postgres import CONNECTION_ERRORS, PostgresStore, connect, create_pool, run_migrations
from authsvc.storage.redis import RedisCounter
from authsvc.tlsfiles import http_contexts

log = logging.getLogger("authsvc")
T = TypeVar("T")
#: After the drain: how long calls already in flight may take before the server cancels them.
STOP_GRACE_SECONDS = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def _setting(name: str) -> Iterator[None]:
    """A driver's start-up error, named after the setting that fed it (the one place that does so)."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{name} {exc}") from None
    except Unavailable as exc:
        raise Unavailable(f"{exc}; check {name}") from None


def utcnow() -> datetime:
    return datetime.now(UTC)


def database_dsn(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on demand)."""
    if settings.database_url is not None:
        return settings.database_url.value
    return embedded.start(settings.data_dir)


def migrate(settings: Settings, dsn: str | None = None) -> list[str]:
    with _setting("AUTHSVC_DATABASE_URL"):
        return asyncio.run(run_migrations(dsn or database_dsn(settings)))


async def verify_audit(settings: Settings, org_id: str | None) -> audit.Verification:
    """``authsvc audit verify``: walk the hash chains in PostgreSQL."""
    return await _on_audit_chain(settings, lambda conn: audit.verify(conn, org_id))


async def prune_audit(settings: Settings) -> int:
    """``authsvc audit prune``: events older than the retention, oldest first, in small batches."""
    return await _on_audit_chain(settings, lambda conn: audit.prune(conn, settings.audit_retention_days))


async def _on_audit_chain(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    with _setting("AUTHSVC_DATABASE_URL"):
        conn = await connect(database_dsn(settings))
    try:
        return await work(conn)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError, asyncpg.UndefinedColumnError):
        raise ConfigError("the database schema has no audit chain yet; run `authsvc migrate` first") from None
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"lost the connection to PostgreSQL ({type(exc).__name__}); retry") from None
    finally:
        await conn.close()


def install_event_loop() -> None:
    """uvloop when available: measurably cheaper per RPC than the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


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


class App:
    """One authsvc process: store, feed, cache, batchers and the gRPC server, started and stopped in order."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        listen: str | None = None,
        extra_listen: tuple[str, ...] = (),
        reuse_port: bool = False,
        migrate: bool = True,
        metrics_dir: Path | None = None,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.listen = listen or settings.listen
        self.extra_listen = extra_listen
        self.reuse_port = reuse_port
        #: ``authsvc serve`` migrates once before its processes start; an App on its own (tests) migrates itself.
        self.migrate = migrate
        self.port = 0
        #: The ext_authz HTTP listener's port; 0 while it is off (``AUTHSVC_HTTP_AUTHZ_LISTEN=""``).
        self.http_port = 0
        self._http: HttpServer | None = None
        self._http_adapter: extauthz_http.HttpAuthorizationAdapter | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._pruner: audit.AuditPruner | None = None
        #: This process's counts, when metrics are on (``AUTHSVC_METRICS_LISTEN``).
        self.metrics: Metrics | None = None
        #: Under a supervisor: where this worker writes its snapshots for the supervisor's endpoint.
        self.metrics_dir = metrics_dir
        self.worker = worker
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        with _setting("AUTHSVC_DATABASE_URL"):
            if self.migrate:
                await run_migrations(self.dsn)
            self._pool = await create_pool(self.dsn)
        with _setting("AUTHSVC_REDIS_URL"):
            shared = RedisCounter(s.redis_url.value) if s.redis_url else None
        if s.metrics_listen:
            self.metrics = Metrics()
        recorder: Recorder = self.metrics or NO_METRICS
        self.store = PostgresStore(
            self._pool,
            lookup_timeout=s.store_timeout_ms / 1000,
            metrics=recorder,
            max_waiting_lookups=s.max_waiting_lookups,
        )
        cache: DecisionCache[Grant] = DecisionCache(s.cache_size, FRESHNESS, time.monotonic)
        self.feed = PostgresFeed(self.dsn, metrics=recorder)
        self.feed.subscribe(cache)
        self.known = KnownDigests(self.store, time.monotonic)
        self.feed.subscribe(self.known)
        self._known_loader = asyncio.create_task(self.known.run(), name="authsvc-known-digests")
        # After the cache: a client never hears of an invalidation before this process applied it.
        self.fanout = Fanout(lambda: cache.serving)
        self.feed.subscribe(self.fanout)
        await self.feed.start()
        self.fanout.start()
        self.usage = UsageRecorder(self.store, s.last_used_flush_seconds)
        self.usage.start()
        self.limiter = RateLimiter(
            s.rate_limit,
            s.rate_limit_window_seconds,
            shared,
            monotonic=time.monotonic,
            breaker_seconds=s.redis_breaker_ms / 1000,
        )
        key_format = KeyFormat(s.key_prefix)
        #: One bound for every service of the process: what waits in Authorize, Check and the HTTP check
        #: (``Authorizer.complete``), and management calls (the gRPC wrapper), compete for it.
        self.admission = Admission(s.max_concurrent_calls)
        self.authorizer = Authorizer(
            self.store,
            s.catalog,
            key_format,
            clock=time.time,
            cache=cache,
            usage=self.usage,
            limiter=self.limiter,
            metrics=recorder,
            timer=time.perf_counter,
            admission=self.admission,
            known=self.known,
        )
        if self.metrics is not None:
            self.metrics.gauges = self._gauges(cache)
        self.manager = KeyManager(
            self.store,
            s.catalog,
            key_format,
            clock=utcnow,
            max_active_keys=s.max_active_keys,
            max_rotation_grace=timedelta(seconds=s.max_rotation_grace_seconds),
            evict=self.authorizer.evict,
            # Leak reports are counted per caller address across processes, like key limits.
            leak_limiter=RateLimiter(LEAK_REPORTS_PER_MINUTE, 60, shared, monotonic=time.monotonic),
        )
        self.routes = extauthz.RoutePolicy.from_settings(s)
        admin = AdminTokens(s.admin_tokens, s.admin_client_names)
        watch = WatchAdapter(self.fanout, self.usage, time.time, self.authorizer.holder, recorder)
        services = [
            (
                KEY_SERVICE,
                service_handler(
                    KEY_SERVICE,
                    KeyServiceAdapter(self.manager, self.authorizer, watch),
                    admin=admin,
                    protected=MANAGEMENT_METHODS,
                    metrics=recorder,
                    admission=self.admission,
                ),
            ),
            extauthz.service(self.authorizer, self.routes),
        ]
        self.health = HealthServicer()
        #: Per listener (gRPC, HTTP ext_authz), below the raised open-file limit.
        self.connection_cap = connection_cap(s.max_connections, raise_open_file_limit())
        limits = ConnectionLimits(
            max_connections=self.connection_cap,
            handshake_timeout_ms=s.handshake_timeout_ms,
            max_connection_idle_ms=s.max_connection_idle_seconds * 1000,
            max_queued_calls=s.max_queued_calls,
        )
        self._server = build_server(services, self.health, reuse_port=self.reuse_port, limits=limits)
        # Every listener, the per-worker ports and the HTTP ext_authz listener included, speaks TLS when it
        # is configured (the metrics listener too, see serve_process and _supervise).
        self.tls = ReloadingCredentials(s.tls) if s.tls is not None else None
        self._http_tls = http_contexts(s.tls, "the HTTP ext_authz listener") if s.tls and s.http_authz_listen else None
        failed = next((a for a in (self.listen, *self.extra_listen) if not self._bind(a)), None)
        if failed is not None:
            await self._shutdown_internals()
            raise ConfigError(
                f"cannot listen on {failed}: the port is in use or the address is invalid; "
                "set AUTHSVC_LISTEN (or AUTHSVC_WORKER_BASE_PORT)"
            )
        await self._server.start()
        if s.http_authz_listen:
            await self._start_http(s.http_authz_listen)
        await self._set_health(True)
        self._monitor = asyncio.create_task(self._watch_store(), name="authsvc-health")
        self._pruner = audit.AuditPruner(self._pool, s.audit_retention_days)
        self._pruner.start()
        if self.metrics is not None and self.metrics_dir is not None:
            self._flusher = asyncio.create_task(
                flush_forever(self.metrics, self.metrics_dir, self.worker), name="authsvc-metrics"
            )

    def _gauges(self, cache: DecisionCache[Grant]) -> Callable[[], dict[str, float]]:
        """Read at snapshot time from the objects that keep these numbers anyway."""
        pool, limiter, known = self._pool, self.limiter, self.known

        def gauges() -> dict[str, float]:
            idle = pool.get_idle_size()
            return {
                "cache_entries": len(cache),
                "feed_up": 1 if cache.serving else 0,
                "known_loaded": 1 if known.ready else 0,
                "pool_idle": idle,
                "pool_in_use": pool.get_size() - idle,
                "ratelimit_fallback": limiter.shared_failures,
            }

        return gauges

    async def _start_http(self, listen: str) -> None:
        """Envoy's ext_authz HTTP protocol, on the same Authorizer, route rules and admission as Check."""
        self._http_adapter = extauthz_http.HttpAuthorizationAdapter(self.authorizer, self.routes)
        self._http = HttpServer(
            self._http_adapter,
            Limits(handshake_timeout=self.settings.handshake_timeout_ms / 1000, max_connections=self.connection_cap),
            tls=self._http_tls.current if self._http_tls is not None else None,
        )
        try:
            self.http_port = await self._http.start(listen, reuse_port=self.reuse_port)
        except (OSError, ValueError) as exc:
            self._http = None
            await self._server.stop(0)
            await self._shutdown_internals()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"cannot listen on {listen} ({reason}); set AUTHSVC_HTTP_AUTHZ_LISTEN (empty turns it off)"
            ) from None

    def _bind(self, address: str) -> bool:
        try:
            if self.tls is not None:
                port = self._server.add_secure_port(address, self.tls.credentials())
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError:
            return False
        if address == self.listen:
            self.port = port
        return port != 0

    async def _set_health(self, serving: bool) -> None:
        if self._http_adapter is not None:
            self._http_adapter.serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in ("", KEY_SERVICE.full_name, extauthz.AUTHORIZATION_SERVICE.full_name):
            await self.health.set(name, status)

    async def _watch_store(self) -> None:
        """Health says NOT_SERVING while no writable primary can be reached (a standby alone is not enough)."""
        serving = True
        while True:
            await asyncio.sleep(0.5)
            ok = await self.store.ping(budget=1.0)
            if ok != serving:
                serving = ok
                await self._set_health(ok)
                if ok:
                    log.info("database reachable again; serving")
                else:
                    log.warning("no writable primary reachable; health is NOT_SERVING and unknown keys are refused")

    async def stop(self, grace: float = 5.0, *, drain: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """Health first, then the port: NOT_SERVING, ``drain`` seconds of normal service, then ``grace``.

        Health-checking clients (gRPC ``healthCheckConfig``) and Envoy (every
        2 s) move away only once they have seen NOT_SERVING; the drain keeps
        answering the calls they send meanwhile, so a replica's stop fails
        none. Then the server accepts no more calls and gives those in flight
        up to ``grace`` seconds. ``hurry`` (a second Ctrl+C) cuts the drain short.
        """
        if self._monitor is not None:
            self._monitor.cancel()
        if self._pruner is not None:
            await self._pruner.stop()
        await self.health.enter_graceful_shutdown()
        if self._http_adapter is not None:
            self._http_adapter.serving = False  # Envoy's HTTP health check sees the stop too
        if drain > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((hurry or asyncio.Event()).wait(), drain)
        await self.fanout.stop()  # ends every WatchDecisions stream: their clients fall back to calls
        if self._http is not None:
            await asyncio.gather(self._http.stop(grace), self._server.stop(grace))
        else:
            await self._server.stop(grace)
        await self._shutdown_internals()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.metrics is not None and self.metrics_dir is not None:
            write_snapshot(self.metrics, self.metrics_dir, self.worker)  # the drained calls count too

    async def _shutdown_internals(self) -> None:
        self._known_loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._known_loader
        await self.feed.stop()
        await self.usage.stop()
        if self.limiter.shared is not None:
            await self.limiter.shared.close()
        await self._pool.close()


async def serve_process(
    settings: Settings,
    dsn: str,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    metrics_dir: Path | None = None,
) -> int:
    """Run one ``App`` until SIGTERM or SIGINT, then drain; ``worker`` is this process's index under a supervisor.

    The schema is already at head (``serve`` migrates before any process starts).
    """
    stop = asyncio.Event()
    # Ctrl+C while draining skips the rest of the drain. A second SIGTERM does
    # not: systemd signals every process of the service and the supervisor
    # then signals its workers again, which must still drain.
    hurry = asyncio.Event()

    def on_interrupt() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    own = settings.worker_addresses
    extra_listen = own[worker : worker + 1] if worker is not None else own
    app = App(
        settings,
        dsn,
        listen=settings.listen,
        extra_listen=extra_listen,
        reuse_port=reuse_port,
        migrate=False,  # serve() has migrated
        metrics_dir=metrics_dir,
        worker=worker or 0,
    )
    await app.start()
    exporter = None
    if worker is None and app.metrics is not None:  # one process: its own endpoint, read live
        try:
            exporter = MetricsServer(
                settings.metrics_listen,
                live_snapshots(app.metrics, loop),
                tls=settings.tls,
                handshake_timeout=settings.handshake_timeout_ms / 1000,
            )
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
    http_host = settings.http_authz_listen.rpartition(":")[0]
    http = {"http_authz_listen": f"{http_host}:{app.http_port}"} if app.http_port else {}
    extra = (
        {"listen": " ".join((settings.listen, *extra_listen))}
        | http
        | ({"worker": worker} if worker is not None else {})
    )
    log.info("authsvc serving", extra=extra)
    await stop.wait()
    log.info(
        "shutting down: health is NOT_SERVING, still serving for %ss (AUTHSVC_DRAIN_SECONDS), "
        "then finishing in-flight calls",
        f"{settings.drain_seconds:g}",
        extra=extra,
    )
    await app.stop(grace=STOP_GRACE_SECONDS, drain=settings.drain_seconds, hurry=hurry)
    if exporter is not None:
        exporter.stop()
    log.info("stopped", extra=extra)
    return 0


def serve(settings: Settings) -> int:
    """``authsvc serve``: every port checked first, then one process or a supervisor of ``settings.workers``."""
    for address in (settings.listen, *settings.worker_addresses):
        ensure_can_listen(address)
    if settings.http_authz_listen:
        ensure_can_listen(settings.http_authz_listen, "AUTHSVC_HTTP_AUTHZ_LISTEN (empty turns it off)")
    if settings.metrics_listen:
        ensure_can_listen(settings.metrics_listen, "AUTHSVC_METRICS_LISTEN (empty turns it off)")
    if settings.check_management(settings.listen):
        log.warning(
            "management is open on %s: anyone who reaches it can create and revoke keys "
            "(AUTHSVC_INSECURE_MANAGEMENT=true); set AUTHSVC_ADMIN_TOKENS",
            settings.listen,
        )
    raise_open_file_limit()  # here too, so the supervisor and every worker it spawns inherit it
    install_event_loop()
    dsn = database_dsn(settings)
    migrate(settings, dsn)  # once, before any process serves: the schema is at head for all of them
    log.info("effective configuration: %s", " ".join(f"{k}={v}" for k, v in settings.redacted().items()))
    if settings.workers == 1:
        return asyncio.run(serve_process(settings, dsn))
    return _supervise(settings, dsn)


def _worker_main(settings: Settings, dsn: str, index: int, metrics_dir: Path | None) -> None:
    logs.configure(settings.log_level, settings.log_format)
    # The supervisor handles Ctrl+C for the group; workers drain on SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_event_loop()
    try:
        asyncio.run(serve_process(settings, dsn, reuse_port=True, worker=index, metrics_dir=metrics_dir))
    except (ConfigError, Unavailable) as exc:
        log.error("worker %d: %s", index, exc)
        raise SystemExit(2) from None


def _supervise(settings: Settings, dsn: str) -> int:
    """Run ``settings.workers`` processes until asked to stop or one of them dies.

    With metrics on, the supervisor serves ``/metrics``: the sum of the
    snapshots its workers write to a directory private to this run (see
    ``authsvc.metrics``), so the totals start from zero with the service.
    """
    with contextlib.ExitStack() as stack:
        metrics_dir = None
        if settings.metrics_listen:
            metrics_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="authsvc-metrics-")))
            exporter = MetricsServer(
                settings.metrics_listen,
                file_snapshots(metrics_dir),
                tls=settings.tls,
                handshake_timeout=settings.handshake_timeout_ms / 1000,
            )
            exporter.start()
            stack.callback(exporter.stop)
        return _run_workers(settings, dsn, metrics_dir)


def _run_workers(settings: Settings, dsn: str, metrics_dir: Path | None) -> int:
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC threads
    procs: list[BaseProcess] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for index in range(settings.workers):
        proc: BaseProcess = context.Process(
            target=_worker_main, args=(settings, dsn, index, metrics_dir), name=f"authsvc-worker-{index}"
        )
        proc.start()
        procs.append(proc)
    log.info("supervising %d workers", settings.workers, extra={"listen": settings.listen})
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
        proc.join(timeout=settings.drain_seconds + STOP_GRACE_SECONDS + 5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return status
