"""Start-up errors name the variable to change; secrets never show in the effective config."""

from __future__ import annotations

import pytest

from authsvc.config import Settings
from authsvc.errors import ConfigError


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
            "AUTHSVC_ADMIN_TOKENS": "tok-very-secret,tok-other",
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


def test_the_ext_authz_http_listener_is_on_by_default_and_empty_turns_it_off() -> None:
    assert Settings.from_env({}).http_authz_listen == "127.0.0.1:50061"
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": "0.0.0.0:9000"}).http_authz_listen == "0.0.0.0:9000"
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": ""}).http_authz_listen == ""
    assert Settings.from_env({"AUTHSVC_HTTP_AUTHZ_LISTEN": "  "}).http_authz_listen == ""
