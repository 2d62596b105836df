"""One authsvc process: store, cache, listener, batchers and the gRPC server, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from authsvc import extauthz
from authsvc.cache import KeyCache
from authsvc.config import Settings
from authsvc.errors import ConfigError, Unavailable
from authsvc.grpc.keyservice import KeyServiceAdapter
from authsvc.grpc.server import KEY_SERVICE, MANAGEMENT_METHODS, AdminTokens, build_server, service_handler
from authsvc.invalidation import InvalidationListener
from authsvc.keyformat import KeyFormat
from authsvc.metrics import NO_METRICS, Metrics, Recorder, flush_forever, write_snapshot
from authsvc.ratelimit import RateLimiter, RedisCounter
from authsvc.service import KeyService
from authsvc.storage import embedded
from authsvc.storage.migrate import migrate
from authsvc.storage.postgres import PostgresStore, create_pool
from authsvc.usage import UsageRecorder

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def database_dsn(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on demand)."""
    if settings.database_url is not None:
        return settings.database_url.value
    return embedded.start(settings.data_dir)


async def run_migrations(dsn: str) -> list[str]:
    try:
        connection = await asyncpg.connect(dsn, timeout=5.0)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise Unavailable(
            f"cannot connect to PostgreSQL ({type(exc).__name__}: {exc}); check AUTHSVC_DATABASE_URL"
        ) from None
    except ValueError as exc:  # asyncpg's DSN parser: a bad parameter such as ?sslmode=
        raise ConfigError(f"AUTHSVC_DATABASE_URL is not usable: {exc}") from None
    try:
        return await migrate(connection)
    finally:
        await connection.close()


@dataclass
class App:
    settings: Settings
    dsn: str
    listen: str | None = None
    extra_listen: tuple[str, ...] = ()
    reuse_port: bool = False
    migrate: bool = True
    """Workers skip this: their supervisor has migrated once already."""
    port: int = 0
    metrics_dir: Path | None = None
    """Workers write their metrics here for the supervisor's endpoint (see authsvc.metrics)."""
    worker: int = 0
    metrics: Metrics | None = field(init=False, default=None)
    service: KeyService = field(init=False)
    listener: InvalidationListener = field(init=False)
    health: HealthServicer = field(init=False)
    _server: grpc.aio.Server = field(init=False)
    _pool: asyncpg.Pool = field(init=False)
    _store: PostgresStore = field(init=False)
    _usage: UsageRecorder = field(init=False)
    _limiter: RateLimiter = field(init=False)
    _monitor: asyncio.Task[None] | None = None
    _flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        if self.migrate:
            await run_migrations(self.dsn)
        self._pool = await create_pool(self.dsn)
        if s.metrics_listen:
            self.metrics = Metrics()
        recorder: Recorder = self.metrics or NO_METRICS
        self._store = PostgresStore(self._pool, lookup_timeout=s.store_timeout_ms / 1000, metrics=recorder)
        cache = KeyCache(s.cache_size)
        self.listener = InvalidationListener(self.dsn, cache, metrics=recorder)
        self.listener.start()
        self._usage = UsageRecorder(self._store, s.last_used_flush_seconds)
        self._usage.start()
        self._limiter = RateLimiter(
            s.rate_limit, s.rate_limit_window_seconds, RedisCounter(s.redis_url.value) if s.redis_url else None
        )
        self.service = KeyService(
            self._store,
            s.catalog,
            KeyFormat(s.key_prefix),
            max_active_keys=s.max_active_keys,
            cache=cache,
            usage=self._usage,
            limiter=self._limiter,
            metrics=recorder,
        )
        if self.metrics is not None:
            self.metrics.gauges = self._gauges(cache)
        admin = AdminTokens(t.value for t in s.admin_tokens)
        services = [
            (
                KEY_SERVICE,
                service_handler(
                    KEY_SERVICE,
                    KeyServiceAdapter(self.service),
                    admin=admin,
                    protected=MANAGEMENT_METHODS,
                    metrics=recorder,
                ),
            ),
        ]
        services.append(extauthz.service(self.service, s))
        self.health = HealthServicer()
        self._server = build_server(services, self.health, reuse_port=self.reuse_port)
        listen = self.listen or s.listen
        try:
            self.port = self._server.add_insecure_port(listen)
        except RuntimeError:
            self.port = 0
        for extra in self.extra_listen:
            try:
                bound = self._server.add_insecure_port(extra)
            except RuntimeError:
                bound = 0
            if bound == 0:
                self.port = 0
                listen = extra
        if self.port == 0:
            await self._shutdown_internals()
            raise ConfigError(
                f"cannot listen on {listen}: the port is in use or the address is invalid; "
                "set AUTHSVC_LISTEN (or AUTHSVC_WORKER_BASE_PORT)"
            )
        await self._server.start()
        await self._set_health(True)
        self._monitor = asyncio.create_task(self._watch_store(), name="authsvc-health")
        if self.metrics is not None and self.metrics_dir is not None:
            self._flusher = asyncio.create_task(
                flush_forever(self.metrics, self.metrics_dir, self.worker), name="authsvc-metrics"
            )

    def _gauges(self, cache: KeyCache) -> Callable[[], dict[str, float]]:
        """Read at snapshot time from the objects that keep these numbers anyway."""
        pool, limiter = self._pool, self._limiter

        def gauges() -> dict[str, float]:
            idle = pool.get_idle_size()
            return {
                "cache_entries": len(cache),
                "feed_up": 1 if cache.serving else 0,
                "pool_idle": idle,
                "pool_in_use": pool.get_size() - idle,
                "ratelimit_fallback": limiter.shared_failures,
            }

        return gauges

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", KEY_SERVICE.full_name, extauthz.AUTHORIZATION_SERVICE.full_name):
            await self.health.set(name, status)

    async def _watch_store(self) -> None:
        """Health says NOT_SERVING while the database cannot be reached."""
        serving = True
        while True:
            await asyncio.sleep(0.5)
            ok = await self._store.ping(budget=1.0)
            if ok != serving:
                serving = ok
                await self._set_health(ok)
                if ok:
                    log.info("database reachable again; serving")
                else:
                    log.warning("database unreachable; health is NOT_SERVING and unknown keys are refused")

    async def stop(self, grace: float = 5.0) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self._shutdown_internals()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.metrics is not None and self.metrics_dir is not None:
            write_snapshot(self.metrics, self.metrics_dir, self.worker)  # the drained calls count too

    async def _shutdown_internals(self) -> None:
        await self.listener.stop()
        await self._usage.stop()
        if isinstance(self._limiter.shared, RedisCounter):
            await self._limiter.shared.close()
        await self._pool.close()
