"""Settings: the only place that reads the environment.

Every variable is ``AUTHSVC_*``; an invalid value raises ``ConfigError`` with
a one-line message naming the variable, which the CLI prints as is. Every
derived value (the scope catalog, the worker addresses, the HTTP policy) is
worked out here once, at start-up, so a bad value fails before anything runs
and no other module re-derives it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from authsvc_client._http import HttpPolicy

from authsvc import access
from authsvc.access import AdminClient, AdminToken
from authsvc.core.errors import ConfigError
from authsvc.core.keyformat import PREFIX_PATTERN
from authsvc.core.keys import ScopeCatalog
from authsvc.tlsfiles import TlsFiles

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
    http_authz_listen: str = "127.0.0.1:50061"
    """host:port of Envoy's ext_authz HTTP protocol (every worker, SO_REUSEPORT); "" turns it off."""
    workers: int = 1
    """Server processes (``AUTHSVC_WORKERS``, ``--workers``); 0, the default there, means one per core."""
    worker_base_port: int = 0
    """When set, worker i also listens on 127.0.0.1-or-listen-host:(port + i), one endpoint per process (see README)."""
    key_prefix: str = "authsvc"
    """The ``<prefix>`` of issued keys: 2-10 lowercase letters or digits, starting with a letter."""
    scopes_file: Path = DEFAULT_CATALOG
    """TOML scope catalog; see ``authsvc/catalogs/``."""
    max_active_keys: int = 10
    """Active (not revoked, not expired) keys an organization may hold; keys in a rotation's grace do not count."""
    max_rotation_grace_seconds: int = 7 * 86_400
    """The longest grace period RotateKey may give the old key (``AUTHSVC_MAX_ROTATION_GRACE``)."""
    insecure_management: bool = False
    """Accept open management on a non-loopback address (no admin tokens); warned about at every start."""
    drain_seconds: float = 3.0
    """After SIGTERM: how long health says NOT_SERVING while calls are still served, so that
    health-checking clients and Envoy (2 s interval) move away before the port closes."""
    admin_tokens: tuple[AdminToken, ...] = ()
    """Named admin tokens (``AUTHSVC_ADMIN_TOKENS``, ``AUTHSVC_ADMIN_TOKENS_FILE``); see ``authsvc.access``."""
    admin_client_names: tuple[AdminClient, ...] = ()
    """Client-certificate identities that may manage keys without a token (needs ``tls_client_ca_file``)."""
    tls_cert_file: Path | None = None
    """PEM certificate chain served on every listener (gRPC, the HTTP check, metrics); with ``tls_key_file``.
    Unset: plaintext."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificates; set: every client of every listener must present a certificate they issued (mTLS)."""
    store_timeout_ms: int = 100
    """Authorize's budget for a database lookup; past it the answer is UNAVAILABLE (fail closed)."""
    max_concurrent_calls: int = 1000
    """Calls one process has waiting at once: cache misses and rate-limited keys (every transport), and
    management calls; more are refused at once with UNAVAILABLE (the HTTP check: 503), to retry. A cache
    hit of a key without a rate limit never waits and needs no slot."""
    max_connections: int = 4000
    """Open connections per process; more are closed as they arrive. Lowered to stay below the
    open-file limit (raised to its hard limit at start)."""
    handshake_timeout_ms: int = 5000
    """A connection that has not finished TLS and the HTTP/2 preface by then is closed (the HTTP check and
    metrics listeners: the TLS handshake)."""
    max_connection_idle_seconds: int = 300
    """A connection without a call for this long is closed; clients reconnect when they need to."""
    max_queued_calls: int = 512
    """Calls the gRPC core holds per process before Python takes them; from half of it some new calls
    are refused (CANCELLED), past it all: the bound on the wait under overload."""
    max_waiting_lookups: int = 1024
    """Distinct unknown-to-the-cache keys waiting for a database lookup; past it, UNAVAILABLE at once."""
    redis_breaker_ms: int = 1000
    """After a Redis failure, rate limits are counted locally without asking Redis for this long."""
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
    audit_retention_days: int = 400
    """Audit events older than this are pruned (hourly, in small batches); 0 keeps them forever."""
    log_format: str = "text"
    """``text`` (one line per event, for people) or ``json`` (one object per line, for log pipelines)."""

    @functools.cached_property
    def catalog(self) -> ScopeCatalog:
        """Loaded once, when ``from_env`` validates it (so a bad file fails at start-up)."""
        return load_catalog(self.scopes_file)

    @functools.cached_property
    def http_policy(self) -> HttpPolicy:
        """Where HTTP requests carry keys and how denials look, for every HTTP front end."""
        return HttpPolicy(self.key_headers, self.authorization_scheme)

    @property
    def management_protected(self) -> bool:
        """Whether management calls need an admin token or an admin client certificate."""
        return bool(self.admin_tokens or self.admin_client_names)

    @functools.cached_property
    def tls(self) -> TlsFiles | None:
        """The server's TLS files, or ``None`` for plaintext listeners."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return TlsFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    @functools.cached_property
    def worker_addresses(self) -> tuple[str, ...]:
        """Worker i's own address, ``<listen host>:(worker_base_port + i)``; none without a base port."""
        return worker_addresses(self.listen, self.worker_base_port, self.workers)

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
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, listen: str | None = None, workers: int | None = None
    ) -> Settings:
        """The effective settings; ``listen`` and ``workers`` are the CLI's flags, which win over the environment."""
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

        def duration(name: str, default: int, maximum: int) -> int:
            """Seconds, written as ``604800``, ``90s``, ``30m``, ``12h`` or ``7d``."""
            raw = get(name)
            if raw is None:
                return default
            number, unit = (raw[:-1], raw[-1].lower()) if raw[-1:].isalpha() else (raw, "s")
            factor = {"s": 1, "m": 60, "h": 3600, "d": 86_400}.get(unit)
            if factor is None or not number.strip().isdigit():
                raise ConfigError(f"AUTHSVC_{name} must be a duration such as 7d, 12h, 30m or 90s, got {raw!r}")
            value = int(number) * factor
            if value > maximum:
                raise ConfigError(f"AUTHSVC_{name} must be at most {maximum // 86_400}d, got {raw!r}")
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
        if listen is not None:
            check_listen(listen, "--listen")
        else:
            listen = get("LISTEN") or cls.listen
            check_listen(listen, "AUTHSVC_LISTEN")
        if workers is None:
            workers = integer("WORKERS", 0, 0, 64)
        elif not 0 <= workers <= 64:
            raise ConfigError("--workers must be between 0 and 64")
        workers = workers or (os.cpu_count() or 1)
        http_authz_listen = env.get("AUTHSVC_HTTP_AUTHZ_LISTEN", cls.http_authz_listen).strip()
        if http_authz_listen:
            check_listen(http_authz_listen, "AUTHSVC_HTTP_AUTHZ_LISTEN")
        database_url = get("DATABASE_URL")
        if database_url is not None:
            if not database_url.startswith(("postgres://", "postgresql://")):
                raise ConfigError("AUTHSVC_DATABASE_URL must start with postgresql:// (or postgres://)")
            check_url(database_url, "AUTHSVC_DATABASE_URL", "postgresql://user@127.0.0.1:5432/authsvc")
            database_session_attrs(database_url)
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
        insecure_raw = (get("INSECURE_MANAGEMENT") or "false").lower()
        if insecure_raw not in ("true", "false"):
            raise ConfigError(f"AUTHSVC_INSECURE_MANAGEMENT must be true or false, got {insecure_raw!r}")
        drain_raw = get("DRAIN_SECONDS")
        try:
            drain = float(drain_raw) if drain_raw is not None else cls.drain_seconds
        except ValueError:
            raise ConfigError(f"AUTHSVC_DRAIN_SECONDS must be a number, got {drain_raw!r}") from None
        if not 0 <= drain <= 300:
            raise ConfigError("AUTHSVC_DRAIN_SECONDS must be between 0 and 300")
        cert_file, key_file, client_ca_file = (
            Path(v) if (v := get(name)) else None for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")
        )
        if (cert_file is None) != (key_file is None):
            raise ConfigError("AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE must be set together (or neither)")
        if client_ca_file is not None and cert_file is None:
            raise ConfigError(
                "AUTHSVC_TLS_CLIENT_CA_FILE needs TLS: set AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE"
            )
        tokens_file = get("ADMIN_TOKENS_FILE")
        admin_tokens = access.parse_tokens(get("ADMIN_TOKENS"), Path(tokens_file) if tokens_file else None)
        admin_clients = access.parse_clients(get("ADMIN_CLIENT_NAMES"))
        if admin_clients and client_ca_file is None:
            raise ConfigError(
                "AUTHSVC_ADMIN_CLIENT_NAMES needs client certificates: set AUTHSVC_TLS_CLIENT_CA_FILE (mTLS)"
            )
        shared_names = {t.name for t in admin_tokens} & {c.name for c in admin_clients}
        if shared_names:
            raise ConfigError(
                f"AUTHSVC_ADMIN_CLIENT_NAMES: {sorted(shared_names)[0]} is also an admin token's name; "
                "audit rows could not tell them apart"
            )
        settings = cls(
            database_url=Secret(database_url) if database_url else None,
            data_dir=Path(get("DATA_DIR") or cls.data_dir),
            listen=listen,
            http_authz_listen=http_authz_listen,
            workers=workers,
            worker_base_port=integer("WORKER_BASE_PORT", cls.worker_base_port, 0, 65535),
            key_prefix=prefix,
            scopes_file=scopes_file,
            max_active_keys=integer("MAX_ACTIVE_KEYS", cls.max_active_keys, 1, 10_000),
            max_rotation_grace_seconds=duration("MAX_ROTATION_GRACE", cls.max_rotation_grace_seconds, 365 * 86_400),
            insecure_management=insecure_raw == "true",
            drain_seconds=drain,
            admin_tokens=admin_tokens,
            admin_client_names=admin_clients,
            tls_cert_file=cert_file,
            tls_key_file=key_file,
            tls_client_ca_file=client_ca_file,
            store_timeout_ms=integer("STORE_TIMEOUT_MS", cls.store_timeout_ms, 5, 10_000),
            max_concurrent_calls=integer("MAX_CONCURRENT_CALLS", cls.max_concurrent_calls, 1, 1_000_000),
            max_connections=integer("MAX_CONNECTIONS", cls.max_connections, 1, 1_000_000),
            handshake_timeout_ms=integer("HANDSHAKE_TIMEOUT_MS", cls.handshake_timeout_ms, 100, 60_000),
            max_connection_idle_seconds=integer(
                "MAX_CONNECTION_IDLE_SECONDS", cls.max_connection_idle_seconds, 1, 86_400
            ),
            max_queued_calls=integer("MAX_QUEUED_CALLS", cls.max_queued_calls, 4, 1_000_000),
            max_waiting_lookups=integer("MAX_WAITING_LOOKUPS", cls.max_waiting_lookups, 1, 1_000_000),
            redis_breaker_ms=integer("REDIS_BREAKER_MS", cls.redis_breaker_ms, 10, 60_000),
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
            audit_retention_days=integer("AUDIT_RETENTION_DAYS", cls.audit_retention_days, 0, 36_500),
            log_format=log_format,
            metrics_listen=metrics_listen,
        )
        catalog = settings.catalog  # fail at start-up, not on the first request
        settings.worker_addresses  # noqa: B018  # checked (and derived) here, once
        if settings.tls is not None:
            settings.tls.load()  # a bad certificate or key fails here, in one line, not at the first handshake
        for method, scope in settings.method_scopes:
            if scope not in catalog:
                raise ConfigError(f"AUTHSVC_METHOD_SCOPES: {method}={scope}: {scope!r} is not in the scope catalog")
        return settings

    def check_management(self, listen: str) -> bool:
        """Refuse open management where other machines can reach it; True when only the override allows it.

        Without admin tokens anyone who reaches the port creates and revokes
        keys in any organization. On loopback only local processes can; on
        any other address (``0.0.0.0`` in a container) that must be a
        deliberate choice, so the default is to refuse to start.
        """
        if self.management_protected or is_loopback(listen):
            return False
        if self.insecure_management:
            return True
        raise ConfigError(
            f"listening on {listen} with open management: set AUTHSVC_ADMIN_TOKENS (or, with mTLS, "
            "AUTHSVC_ADMIN_CLIENT_NAMES; or AUTHSVC_INSECURE_MANAGEMENT=true to allow anyone who reaches "
            "the port to manage keys)"
        )


def is_loopback(listen: str) -> bool:
    """Whether only this machine can reach ``host:port``: localhost or a loopback IP, nothing resolved."""
    host = listen.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def load_catalog(path: Path) -> ScopeCatalog:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"AUTHSVC_SCOPES_FILE: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"AUTHSVC_SCOPES_FILE: {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"AUTHSVC_SCOPES_FILE: {path} is not valid TOML: {exc}") from None
    return ScopeCatalog.from_mapping(data, f"AUTHSVC_SCOPES_FILE {path}")


def check_listen(value: str, name: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, e.g. 127.0.0.1:50051, got {value!r}")


def check_url(value: str, name: str, example: str) -> None:
    """The URL's shape (hosts, ports) is checked here, so a typo fails at start-up in one line.

    PostgreSQL URLs may list several hosts (``h1:5432,h2:5433``, for
    failover); each is checked on its own. The messages never quote the URL
    or any part of it: in a malformed URL nobody can tell where the password
    ends (``svc:s3cr3t?x@host`` is read as host ``svc``, port ``s3cr3t``),
    so any echoed fragment may be a piece of it.
    """
    encode = "percent-encode @ : / ? # % in the user name and password"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{name} is not a valid URL: {problem}; {encode}, e.g. {example}")

    authority = value.partition("://")[2]
    if "@" in authority.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[0]:
        raise fail("it has more than one @ before the host")
    if re.search(r"%(?![0-9A-Fa-f]{2})", value):
        raise fail("a % is not followed by two hex digits")
    try:
        parts = urllib.parse.urlsplit(value)
        hosts = parts.netloc.rpartition("@")[2]
        for host in hosts.split(","):
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018  # parsing the port is the check
    except ValueError:
        raise fail("a host is malformed or a port is not a number from 0 to 65535") from None
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise fail("the path must be a database number such as /0")  # redis-py would ignore it silently
    if parts.scheme in ("redis", "rediss", "unix"):
        from redis.connection import parse_url  # the driver's own rules for query parameters

        try:
            parse_url(value)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        except ValueError as exc:
            raise ConfigError(f"{name} is not usable: {scrub(str(exc), value)}") from None


def url_secrets(url: str) -> tuple[str, ...]:
    """What in ``url`` may be a password, even when the URL is malformed.

    The user-info password is taken as everything from the first ``:`` after
    ``scheme://`` to the *last* ``@``, which covers passwords holding an
    unencoded ``@ / ? #`` (a parser would split those elsewhere); query
    parameters named ``password`` or ``sslpassword`` are secrets too. Both
    the raw and the percent-decoded spelling are returned.
    """
    found: list[str] = []
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    for part in url.partition("?")[2].split("&"):
        param, eq, value = part.partition("=")
        if eq and param.lower() in ("password", "sslpassword"):
            found.append(value.partition("#")[0])
    out: list[str] = []
    for secret in found:
        for form in (secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)):
            if form and form not in out:
                out.append(form)
    return tuple(out)


_MIN_FRAGMENT = 4
"""Shorter runs of a password's characters are too common to mask without garbling the message."""


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) with every piece of ``url``'s passwords masked as ``***``.

    Drivers quote what they failed to parse, which in a malformed URL is
    often part of the password (asyncpg: ``invalid literal for int() ...
    's3cr3t@host:1'``). Masked are the whole password and every run of at
    least four of its consecutive characters, so a message that quotes only
    a fragment leaks nothing either. The one helper for every message that
    wraps a driver's text (migrations, the pool, Redis).
    """
    secrets = url_secrets(url)
    if not secrets:
        return text
    masked = [False] * len(text)
    for secret in secrets:
        shortest = min(_MIN_FRAGMENT, len(secret))
        for start in range(len(text)):
            # The longest run of the secret's characters that starts here.
            length = 0
            for end in range(len(text), start + shortest - 1, -1):
                if text[start:end] in secret:
                    length = end - start
                    break
            for i in range(start, start + length):
                masked[i] = True
    out: list[str] = []
    for i, char in enumerate(text):
        if not masked[i]:
            out.append(char)
        elif i == 0 or not masked[i - 1]:
            out.append("***")
    return "".join(out)


def database_session_attrs(url: str) -> str:
    """Always ``read-write``, the strictest ``target_session_attrs`` there is.

    authsvc writes, and its cache trusts only the notifications of the server
    it listens on, so the writable primary is the one server that will do. A
    URL asking for anything else (``any``, ``standby``, even ``primary``,
    which admits a read-only server) is refused at start-up.
    """
    given = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("target_session_attrs")
    if given and given[-1] != "read-write":
        raise ConfigError(
            f"AUTHSVC_DATABASE_URL: target_session_attrs={given[-1]} could reach a server that cannot take writes; "
            "authsvc needs the writable primary: remove the parameter or set it to read-write"
        )
    return "read-write"


def worker_addresses(listen: str, base_port: int, workers: int) -> tuple[str, ...]:
    """Worker i's own address, ``<listen host>:(base_port + i)``; none without a base port.

    The ports must exist and must not include ``listen``.
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
