"""Settings: the only place that reads the environment.

Every variable is ``AUTHSVC_*``; an invalid value raises ``ConfigError`` with
a one-line message naming the variable, which the CLI prints as is.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from authsvc.errors import ConfigError
from authsvc.keyformat import PREFIX_PATTERN
from authsvc.keys import ScopeCatalog

DEFAULT_CATALOG = Path(__file__).parent / "catalogs" / "default.toml"


@dataclass(frozen=True)
class Secret:
    """A string whose repr never shows it (admin tokens, passwords in URLs)."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(<redacted>)" if self.value else "Secret('')"


@dataclass(frozen=True)
class Settings:
    """Effective configuration of one authsvc process."""

    database_url: Secret | None = None
    """PostgreSQL URL (asyncpg form). Unset: start the embedded PostgreSQL in ``data_dir``."""
    data_dir: Path = Path(".authsvc")
    """Where the embedded PostgreSQL keeps its data when no database URL is set."""
    listen: str = "127.0.0.1:50051"
    """host:port of the gRPC server (KeyService, Envoy Check, health, reflection)."""
    workers: int = 0
    """Server processes; 0 (the default) means one per core."""
    worker_base_port: int = 0
    """When set, worker i also listens on 127.0.0.1-or-listen-host:(port + i), one endpoint per process (see README)."""
    key_prefix: str = "authsvc"
    """The ``<prefix>`` of issued keys: 2-10 lowercase letters or digits, starting with a letter."""
    scopes_file: Path = DEFAULT_CATALOG
    """TOML scope catalog; see ``authsvc/catalogs/``."""
    max_active_keys: int = 10
    """Active (not revoked, not expired) keys an organization may hold."""
    admin_tokens: tuple[Secret, ...] = ()
    """When set, management RPCs need ``authorization: Bearer <token>``."""
    store_timeout_ms: int = 100
    """Authorize's budget for a database lookup; past it the answer is UNAVAILABLE (fail closed)."""
    last_used_flush_seconds: float = 5.0
    """How often batched ``last_used_time`` updates are written (the documented delay bound)."""
    cache_size: int = 100_000
    """Key records cached per process (positive and negative entries)."""
    redis_url: Secret | None = None
    """Redis for rate limits shared by all processes; unset: each process limits locally."""
    rate_limit: int = 0
    """Default requests per window per key; 0 means unlimited. Keys may set their own."""
    rate_limit_window_seconds: int = 60
    """Length of the fixed rate-limit window."""
    key_headers: tuple[str, ...] = ("x-api-key",)
    """Envoy Check: request headers that carry the bare key."""
    authorization_scheme: str = "ApiKey"
    """Envoy Check: ``authorization: <scheme> <key>`` is accepted too; empty disables it."""
    identity_header_prefix: str = "x-authsvc-"
    """Envoy Check: prefix of the identity headers added for the upstream."""
    method_scopes: tuple[tuple[str, str], ...] = (
        ("GET", "read"),
        ("HEAD", "read"),
        ("OPTIONS", "read"),
        ("*", "write"),
    )
    """Envoy Check: required scope by HTTP method when the route names none."""
    metrics_listen: str = "127.0.0.1:9464"
    """host:port of the Prometheus ``/metrics`` endpoint (all workers' totals); empty disables metrics."""
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` (one line per event, for people) or ``json`` (one object per line, for log pipelines)."""

    @functools.cached_property
    def catalog(self) -> ScopeCatalog:
        """Loaded once, when ``from_env`` validates it (so a bad file fails at start-up)."""
        return ScopeCatalog.load(self.scopes_file)

    def redacted(self) -> dict[str, str]:
        """The effective configuration for the start-up log, secrets masked."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("database_url", "redis_url") and value is not None:
                out[f.name] = _redact_url(value.value)
            else:
                out[f.name] = repr(value)
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(f"AUTHSVC_{name}")
            return value.strip() if value is not None and value.strip() else None

        def integer(name: str, default: int, minimum: int, maximum: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"AUTHSVC_{name} must be a whole number, got {raw!r}") from None
            if not minimum <= value <= maximum:
                raise ConfigError(f"AUTHSVC_{name} must be between {minimum} and {maximum}, got {value}")
            return value

        def word_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            raw = get(name)
            if raw is None:
                return default
            return tuple(part.strip() for part in raw.split(",") if part.strip())

        prefix = get("KEY_PREFIX") or cls.key_prefix
        if not PREFIX_PATTERN.fullmatch(prefix):
            raise ConfigError(
                f"AUTHSVC_KEY_PREFIX must be 2-10 lowercase letters or digits starting with a letter, got {prefix!r}"
            )
        listen = get("LISTEN") or cls.listen
        check_listen(listen, "AUTHSVC_LISTEN")
        database_url = get("DATABASE_URL")
        if database_url is not None:
            if not database_url.startswith(("postgres://", "postgresql://")):
                raise ConfigError("AUTHSVC_DATABASE_URL must start with postgresql:// (or postgres://)")
            check_url(database_url, "AUTHSVC_DATABASE_URL", "postgresql://user@127.0.0.1:5432/authsvc")
        redis_url = get("REDIS_URL")
        if redis_url is not None:
            if not redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError("AUTHSVC_REDIS_URL must start with redis://, rediss:// or unix://")
            check_url(redis_url, "AUTHSVC_REDIS_URL", "redis://127.0.0.1:6379/0")
        log_level = (get("LOG_LEVEL") or "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"AUTHSVC_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        metrics_listen = env.get("AUTHSVC_METRICS_LISTEN", cls.metrics_listen).strip()
        if metrics_listen:
            check_listen(metrics_listen, "AUTHSVC_METRICS_LISTEN")
        log_format = (get("LOG_FORMAT") or cls.log_format).lower()
        if log_format not in ("text", "json"):
            raise ConfigError(f"AUTHSVC_LOG_FORMAT must be text or json, got {log_format!r}")
        flush_raw = get("LAST_USED_FLUSH_SECONDS")
        try:
            flush = float(flush_raw) if flush_raw is not None else cls.last_used_flush_seconds
        except ValueError:
            raise ConfigError(f"AUTHSVC_LAST_USED_FLUSH_SECONDS must be a number, got {flush_raw!r}") from None
        if not 0.05 <= flush <= 10:
            raise ConfigError("AUTHSVC_LAST_USED_FLUSH_SECONDS must be between 0.05 and 10")
        scopes_file = Path(get("SCOPES_FILE") or DEFAULT_CATALOG)
        method_scopes = []
        for rule in word_list("METHOD_SCOPES", ()):
            method, sep, scope = rule.partition("=")
            if not sep or not method.strip() or not scope.strip():
                raise ConfigError(f"AUTHSVC_METHOD_SCOPES: {rule!r} must look like METHOD=scope (or *=scope)")
            method_scopes.append((method.strip().upper(), scope.strip()))
        if method_scopes and "*" not in (method for method, _ in method_scopes):
            # Without a default, a method nobody listed (DELETE, PATCH, ...) would need no scope at all.
            raise ConfigError("AUTHSVC_METHOD_SCOPES needs a default rule for the other methods, e.g. ...,*=write")
        settings = cls(
            database_url=Secret(database_url) if database_url else None,
            data_dir=Path(get("DATA_DIR") or cls.data_dir),
            listen=listen,
            workers=integer("WORKERS", cls.workers, 0, 64),
            worker_base_port=integer("WORKER_BASE_PORT", cls.worker_base_port, 0, 65535),
            key_prefix=prefix,
            scopes_file=scopes_file,
            max_active_keys=integer("MAX_ACTIVE_KEYS", cls.max_active_keys, 1, 10_000),
            admin_tokens=tuple(Secret(t) for t in word_list("ADMIN_TOKENS", ())),
            store_timeout_ms=integer("STORE_TIMEOUT_MS", cls.store_timeout_ms, 5, 10_000),
            last_used_flush_seconds=flush,
            cache_size=integer("CACHE_SIZE", cls.cache_size, 0, 100_000_000),
            redis_url=Secret(redis_url) if redis_url else None,
            rate_limit=integer("RATE_LIMIT", cls.rate_limit, 0, 1_000_000_000),
            rate_limit_window_seconds=integer("RATE_LIMIT_WINDOW_SECONDS", cls.rate_limit_window_seconds, 1, 86_400),
            key_headers=tuple(h.lower() for h in word_list("KEY_HEADERS", cls.key_headers)),
            authorization_scheme=env.get("AUTHSVC_AUTHORIZATION_SCHEME", cls.authorization_scheme).strip(),
            identity_header_prefix=(get("IDENTITY_HEADER_PREFIX") or cls.identity_header_prefix).lower(),
            method_scopes=tuple(method_scopes) or cls.method_scopes,
            log_level=log_level,
            log_format=log_format,
            metrics_listen=metrics_listen,
        )
        catalog = settings.catalog  # fail at start-up, not on the first request
        for method, scope in settings.method_scopes:
            if scope not in catalog:
                raise ConfigError(f"AUTHSVC_METHOD_SCOPES: {method}={scope}: {scope!r} is not in the scope catalog")
        return settings


def check_listen(value: str, name: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, e.g. 127.0.0.1:50051, got {value!r}")


def check_url(value: str, name: str, example: str) -> None:
    """The URL's shape (hosts, ports) is checked here, so a typo fails at start-up in one line.

    PostgreSQL URLs may list several hosts (``h1:5432,h2:5433``, for
    failover); each is checked on its own.
    """
    try:
        parts = urllib.parse.urlsplit(value)
        hosts = parts.netloc.rpartition("@")[2]
        for host in hosts.split(","):
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018  # parsing the port is the check
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL ({exc}), e.g. {example}") from None


def worker_addresses(listen: str, base_port: int, workers: int) -> tuple[str, ...]:
    """Worker i's own address, ``<listen host>:(base_port + i)``; none without a base port.

    Checked here, once: the ports must exist and must not include ``listen``.
    """
    if not base_port:
        return ()
    last = base_port + workers - 1
    if last > 65535:
        raise ConfigError(f"AUTHSVC_WORKER_BASE_PORT: {workers} workers need ports {base_port}-{last}, past 65535")
    host, _, port = listen.rpartition(":")
    if base_port <= int(port) <= last:
        raise ConfigError(
            f"AUTHSVC_WORKER_BASE_PORT: the per-worker ports {base_port}-{last} include the listen port {port}; "
            "pick a range apart from it"
        )
    return tuple(f"{host}:{base_port + i}" for i in range(workers))


def _redact_url(url: str) -> str:
    """Mask the password, whether in ``user:pass@`` or in the query string (``?password=``)."""
    scheme, sep, rest = url.partition("://")
    rest, qmark, query = rest.partition("?")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostpart}"
    if query:
        query = "&".join(
            f"{name}=***" if name.lower() in ("password", "sslpassword") else f"{name}{eq}{value}"
            for name, eq, value in (part.partition("=") for part in query.split("&"))
        )
    return f"{scheme}{sep}{rest}{qmark}{query}"
