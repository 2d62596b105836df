"""One authsvc process: store, cache, listener, batchers and the gRPC server, started and stopped in order."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg
import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from authsvc import extauthz, extauthz_http
from authsvc.cache import KeyCache
from authsvc.config import Settings
from authsvc.errors import ConfigError, Unavailable
from authsvc.grpc.keyservice import KeyServiceAdapter
from authsvc.grpc.server import KEY_SERVICE, MANAGEMENT_METHODS, AdminTokens, build_server, service_handler
from authsvc.http_server import HttpServer
from authsvc.invalidation import InvalidationListener
from authsvc.keyformat import KeyFormat
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
    http_port: int = 0
    """The ext_authz HTTP listener's port; 0 while it is off (``AUTHSVC_HTTP_AUTHZ_LISTEN=""``)."""
    service: KeyService = field(init=False)
    listener: InvalidationListener = field(init=False)
    health: HealthServicer = field(init=False)
    _server: grpc.aio.Server = field(init=False)
    _pool: asyncpg.Pool = field(init=False)
    _store: PostgresStore = field(init=False)
    _usage: UsageRecorder = field(init=False)
    _limiter: RateLimiter = field(init=False)
    _monitor: asyncio.Task[None] | None = None
    _http: HttpServer | None = None
    _http_adapter: extauthz_http.HttpAuthorizationAdapter | None = None

    async def start(self) -> None:
        s = self.settings
        if self.migrate:
            await run_migrations(self.dsn)
        self._pool = await create_pool(self.dsn)
        self._store = PostgresStore(self._pool, lookup_timeout=s.store_timeout_ms / 1000)
        cache = KeyCache(s.cache_size)
        self.listener = InvalidationListener(self.dsn, cache)
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
        )
        admin = AdminTokens(t.value for t in s.admin_tokens)
        services = [
            (
                KEY_SERVICE,
                service_handler(
                    KEY_SERVICE, KeyServiceAdapter(self.service), admin=admin, protected=MANAGEMENT_METHODS
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
        if s.http_authz_listen:
            await self._start_http(s.http_authz_listen)
        await self._set_health(True)
        self._monitor = asyncio.create_task(self._watch_store(), name="authsvc-health")

    async def _start_http(self, listen: str) -> None:
        """Envoy's ext_authz HTTP protocol, on the same KeyService and policy as Check."""
        self._http_adapter = extauthz_http.HttpAuthorizationAdapter(
            self.service, extauthz.HttpPolicy.from_settings(self.settings)
        )
        self._http = HttpServer(self._http_adapter)
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

    async def _set_health(self, serving: bool) -> None:
        if self._http_adapter is not None:
            self._http_adapter.serving = serving
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
        if self._http_adapter is not None:
            self._http_adapter.serving = False
        if self._http is not None:
            await asyncio.gather(self._http.stop(grace), self._server.stop(grace))
        else:
            await self._server.stop(grace)
        await self._shutdown_internals()

    async def _shutdown_internals(self) -> None:
        await self.listener.stop()
        await self._usage.stop()
        if isinstance(self._limiter.shared, RedisCounter):
            await self._limiter.shared.close()
        await self._pool.close()
