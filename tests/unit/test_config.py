"""Start-up errors name the variable to change; secrets never show in the effective config."""

from __future__ import annotations

import pytest

from authsvc.config import Settings, scrub
from authsvc.core.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AUTHSVC_KEY_PREFIX": "Bad_Prefix"}, "AUTHSVC_KEY_PREFIX"),
        ({"AUTHSVC_LISTEN": "nowhere"}, "AUTHSVC_LISTEN"),
        ({"AUTHSVC_HTTP_AUTHZ_LISTEN": "50061"}, "AUTHSVC_HTTP_AUTHZ_LISTEN"),
        ({"AUTHSVC_HTTP_AUTHZ_LISTEN": "127.0.0.1:http"}, "AUTHSVC_HTTP_AUTHZ_LISTEN"),
        ({"AUTHSVC_MAX_ACTIVE_KEYS": "ten"}, "AUTHSVC_MAX_ACTIVE_KEYS"),
        ({"AUTHSVC_MAX_ACTIVE_KEYS": "0"}, "AUTHSVC_MAX_ACTIVE_KEYS"),
        ({"AUTHSVC_DATABASE_URL": "mysql://x"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_SCOPES_FILE": "/nonexistent/scopes.toml"}, "AUTHSVC_SCOPES_FILE"),
        ({"AUTHSVC_LOG_LEVEL": "LOUD"}, "AUTHSVC_LOG_LEVEL"),
        ({"AUTHSVC_METHOD_SCOPES": "GET=admin,*=write"}, "AUTHSVC_METHOD_SCOPES"),
        ({"AUTHSVC_METHOD_SCOPES": "GET=read,POST=write"}, "AUTHSVC_METHOD_SCOPES"),  # no default: DELETE unchecked
        ({"AUTHSVC_DATABASE_URL": "postgresql://u@127.0.0.1:abc/x"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_DATABASE_URL": "postgresql://u@[::1/x"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_REDIS_URL": "redis://127.0.0.1:abc/0"}, "AUTHSVC_REDIS_URL"),
        ({"AUTHSVC_REDIS_URL": "redis://[::1"}, "AUTHSVC_REDIS_URL"),
        ({"AUTHSVC_LAST_USED_FLUSH_SECONDS": "60"}, "AUTHSVC_LAST_USED_FLUSH_SECONDS"),
        ({"AUTHSVC_REDIS_URL": "localhost:6379"}, "AUTHSVC_REDIS_URL"),
        ({"AUTHSVC_AUDIT_RETENTION_DAYS": "a year"}, "AUTHSVC_AUDIT_RETENTION_DAYS"),
        ({"AUTHSVC_AUDIT_RETENTION_DAYS": "-1"}, "AUTHSVC_AUDIT_RETENTION_DAYS"),
        # Only the writable primary will do: a standby misses nothing less than every write.
        ({"AUTHSVC_DATABASE_URL": "postgresql://u@h1,h2/db?target_session_attrs=any"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_DATABASE_URL": "postgresql://u@h1,h2/db?target_session_attrs=standby"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_DATABASE_URL": "postgresql://u@h1,h2/db?target_session_attrs=primary"}, "AUTHSVC_DATABASE_URL"),
        ({"AUTHSVC_DRAIN_SECONDS": "soon"}, "AUTHSVC_DRAIN_SECONDS"),
        ({"AUTHSVC_DRAIN_SECONDS": "-1"}, "AUTHSVC_DRAIN_SECONDS"),
        ({"AUTHSVC_INSECURE_MANAGEMENT": "yes"}, "AUTHSVC_INSECURE_MANAGEMENT"),
        ({"AUTHSVC_MAX_ROTATION_GRACE": "a week"}, "AUTHSVC_MAX_ROTATION_GRACE"),
        ({"AUTHSVC_MAX_ROTATION_GRACE": "7w"}, "AUTHSVC_MAX_ROTATION_GRACE"),
        ({"AUTHSVC_MAX_ROTATION_GRACE": "-1d"}, "AUTHSVC_MAX_ROTATION_GRACE"),
        ({"AUTHSVC_MAX_ROTATION_GRACE": "400d"}, "AUTHSVC_MAX_ROTATION_GRACE"),
        ({"AUTHSVC_MAX_QUEUED_CALLS": "many"}, "AUTHSVC_MAX_QUEUED_CALLS"),
        ({"AUTHSVC_MAX_QUEUED_CALLS": "2"}, "AUTHSVC_MAX_QUEUED_CALLS"),  # no queue at all: every burst refused
    ],
)
def test_invalid_setting_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert variable in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h1:5432,h2:5433/db",  # several hosts, for failover
        "postgresql://u@h1:5432,h2/db",
        "postgresql://u@[::1]:5432,[::2]:5433/db",
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
    ],
)
def test_valid_database_urls_are_accepted(url: str) -> None:
    assert Settings.from_env({"AUTHSVC_DATABASE_URL": url}).database_url is not None


def test_defaults_need_no_configuration() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None  # the embedded PostgreSQL
    assert settings.max_active_keys == 10
    assert settings.catalog.effective(["write"]) == {"read", "write"}


def test_effective_config_redacts_passwords_and_tokens() -> None:
    settings = Settings.from_env(
        {
            "AUTHSVC_DATABASE_URL": "postgresql://svc:hunter2@db:5432/authsvc",
            "AUTHSVC_ADMIN_TOKENS": "ci:tok-very-secret-0123,ops:tok-other-0123456",
            "AUTHSVC_REDIS_URL": "redis://:redispass@cache:6379/0",
        }
    )
    in_query = Settings.from_env(
        {"AUTHSVC_DATABASE_URL": "postgresql://svc@db/authsvc?sslmode=require&password=qwerty"}
    )
    assert "qwerty" not in " ".join(in_query.redacted().values())
    assert "sslmode=require" in in_query.redacted()["database_url"]
    shown = " ".join(settings.redacted().values()) + repr(settings)
    for secret in ("hunter2", "tok-very-secret", "tok-other", "redispass"):
        assert secret not in shown
    assert "db:5432" in shown


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(None, 7 * 86_400), ("0", 0), ("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43_200), ("14d", 1_209_600)],
)
def test_max_rotation_grace_takes_seconds_or_a_unit(raw: str | None, seconds: int) -> None:
    env = {} if raw is None else {"AUTHSVC_MAX_ROTATION_GRACE": raw}
    assert Settings.from_env(env).max_rotation_grace_seconds == seconds


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h1,h2/db", "postgresql://u@h1,h2/db?target_session_attrs=read-write", "postgresql:///db"],
)
def test_connections_always_ask_for_the_writable_primary(url: str) -> None:
    from authsvc.storage.topology import connect_options

    assert connect_options(url) == {"target_session_attrs": "read-write"}


@pytest.mark.parametrize(
    ("text", "url", "expected"),
    [
        # asyncpg's text for svc:p@ss:s3cr3t@...: a fragment of the password, quoted.
        (
            "invalid literal for int() with base 10: 's3cr3t@127.0.0.1:1'",
            "postgresql://svc:p@ss:s3cr3t@127.0.0.1:1/db",
            "invalid literal for int() with base 10: '***@127.0.0.1:1'",
        ),
        ("bad value 'hunter2'", "postgresql://u@h/db?sslmode=x&password=hunter2", "bad value '***'"),
        ("bad value 's3/cr3t'", "redis://:s3%2Fcr3t@h:6379/0", "bad value '***'"),  # the decoded spelling too
        ("cannot reach 127.0.0.1:1", "postgresql://svc:s3cr3t@127.0.0.1:1/db", "cannot reach 127.0.0.1:1"),
        ("no password here", "postgresql://svc@127.0.0.1/db", "no password here"),
    ],
)
def test_scrub_masks_every_piece_of_a_password(text: str, url: str, expected: str) -> None:
    assert scrub(text, url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://svc:s3cr3t?x@127.0.0.1/db",
        "postgresql://svc:s3cr3t#x@127.0.0.1/db",
        "postgresql://svc:p@ss:s3cr3t@127.0.0.1/db",
        "redis://:s3cr3t?x@127.0.0.1:6379/0",
        "redis://:s3cr3t@127.0.0.1:6379/0?socket_timeout=s3cr3t",
    ],
)
def test_url_errors_never_quote_the_url(url: str) -> None:
    variable = "AUTHSVC_REDIS_URL" if url.startswith("redis") else "AUTHSVC_DATABASE_URL"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: url})
    assert variable in str(info.value)
    assert "s3cr" not in str(info.value)


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("authsvc.internal:50051", False),  # a name may resolve to anything
    ],
)
def test_open_management_is_refused_unless_only_this_machine_can_reach_it(listen: str, loopback: bool) -> None:
    settings = Settings.from_env({})
    if loopback:
        assert settings.check_management(listen) is False
        return
    with pytest.raises(ConfigError, match="AUTHSVC_ADMIN_TOKENS"):
        settings.check_management(listen)
    assert Settings.from_env({"AUTHSVC_INSECURE_MANAGEMENT": "true"}).check_management(listen) is True
    assert Settings.from_env({"AUTHSVC_ADMIN_TOKENS": "ops:0123456789abcdef"}).check_management(listen) is False


def test_the_ext_authz_http_listener_is_on_by_default_and_empty_turns_it_off() -> None:
    assert Settings.from_env({}).http_authz_listen == "127.0.0.1:50061"
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": "0.0.0.0:9000"}).http_authz_listen == "0.0.0.0:9000"
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": ""}).http_authz_listen == ""
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": "  "}).http_authz_listen == ""
