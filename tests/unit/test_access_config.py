"""Admin tokens, admin client names and TLS settings: accepted forms, one-line errors that never show a token."""

from __future__ import annotations

from pathlib import Path

import pytest
from authsvc_client import TlsConfig

from authsvc.config import Settings
from authsvc.core.errors import ConfigError

TOKEN = "a-long-secret-token-0123456789"


def refused(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message
    return message


def test_named_tokens_with_and_without_organizations() -> None:
    settings = Settings.from_env({"AUTHSVC_ADMIN_TOKENS": f"ci:{TOKEN},acme-bot:{TOKEN}x:acme|beta:eu"})
    ci, bot = settings.admin_tokens
    assert (ci.name, ci.token, ci.orgs) == ("ci", TOKEN, None)
    assert (bot.name, bot.orgs) == ("acme-bot", frozenset({"acme", "beta:eu"}))  # org ids may hold ':'
    assert settings.management_protected
    assert TOKEN not in repr(settings) and TOKEN not in " ".join(settings.redacted().values())
    assert not Settings.from_env({}).management_protected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TOKEN, "has no name: write name:token"),  # today's bare form: refused, the new form shown
        ("ci:short", "at least 16 characters"),
        (f"bad name:{TOKEN}", "the name must be"),
        (f"ci:{TOKEN}:", "organization list"),
        (f"ci:{TOKEN}:not an org", "organization 'not an org'"),
        (f"ci:{TOKEN},ci:{TOKEN}x", "the name ci is used twice"),
        (f"ci:{TOKEN},ops:{TOKEN}", "share one token"),
    ],
)
def test_bad_admin_tokens_are_refused_without_echoing_the_token(value: str, expected: str) -> None:
    message = refused({"AUTHSVC_ADMIN_TOKENS": value})
    assert "AUTHSVC_ADMIN_TOKENS" in message and expected in message


def test_tokens_file_skips_comments_and_must_not_be_readable_by_others(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"# deployers\n\nci:{TOKEN}\n  ops:{TOKEN}y:acme  \n")
    file.chmod(0o640)
    settings = Settings.from_env({"AUTHSVC_ADMIN_TOKENS_FILE": str(file), "AUTHSVC_ADMIN_TOKENS": f"env:{TOKEN}z"})
    assert [(t.name, t.orgs) for t in settings.admin_tokens] == [
        ("env", None),
        ("ci", None),
        ("ops", frozenset({"acme"})),
    ]
    file.chmod(0o644)
    assert "chmod 600" in refused({"AUTHSVC_ADMIN_TOKENS_FILE": str(file)})
    file.chmod(0o600)
    file.write_text(f"ci:{TOKEN}\n{TOKEN}\n")
    assert "AUTHSVC_ADMIN_TOKENS_FILE line 2 has no name" in refused({"AUTHSVC_ADMIN_TOKENS_FILE": str(file)})
    assert "cannot read" in refused({"AUTHSVC_ADMIN_TOKENS_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AUTHSVC_TLS_CERT_FILE": "/x.pem"}, "AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE must be set together"),
        ({"AUTHSVC_TLS_KEY_FILE": "/x.pem"}, "AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE must be set together"),
        ({"AUTHSVC_TLS_CLIENT_CA_FILE": "/ca.pem"}, "AUTHSVC_TLS_CLIENT_CA_FILE needs TLS"),
        ({"AUTHSVC_ADMIN_CLIENT_NAMES": "ops.example"}, "AUTHSVC_ADMIN_CLIENT_NAMES needs client certificates"),
        (
            {"AUTHSVC_TLS_CERT_FILE": "/nope.pem", "AUTHSVC_TLS_KEY_FILE": "/nope.pem"},
            "AUTHSVC_TLS_CERT_FILE: cannot read",
        ),
    ],
)
def test_tls_settings_go_together(env: dict[str, str], expected: str) -> None:
    assert expected in refused(env)


def test_client_names_may_be_uris_and_org_bound() -> None:
    from authsvc.access import parse_clients

    clients = parse_clients("ops.example, spiffe://corp/ns/acme/sa/admin=acme|beta")
    assert [(c.name, c.orgs) for c in clients] == [
        ("ops.example", None),
        ("spiffe://corp/ns/acme/sa/admin", frozenset({"acme", "beta"})),
    ]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_clients("a.example,a.example")


def test_client_tls_config_needs_certificate_and_key_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(certificate_chain=b"cert")
    assert "secret-key" not in repr(TlsConfig(certificate_chain=b"c", private_key=b"secret-key"))
