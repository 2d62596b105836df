"""Semantics 4 and 9: scope implications and the Authorize decision table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from authsvc_client._decision import HTTP_STATUS

from authsvc.config import DEFAULT_CATALOG, load_catalog
from authsvc.core.errors import ConfigError, InvalidArgument
from authsvc.core.keys import ApiKey, KeyGrant, Reason, ScopeCatalog, decide

RESOURCES = DEFAULT_CATALOG.parent / "resources.toml"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def catalog() -> ScopeCatalog:
    return load_catalog(DEFAULT_CATALOG)


def key(**overrides: object) -> ApiKey:
    fields: dict[str, object] = {
        "id": "0b9f6d8e-0000-4000-8000-000000000001",
        "org_id": "acme",
        "name": "ci",
        "prefix": "authsvc_abcd",
        "scopes": ("write",),
        "created_by": "alice",
        "create_time": NOW - timedelta(days=1),
    }
    fields.update(overrides)
    return ApiKey(**fields)  # type: ignore[arg-type]


def test_write_implies_read(catalog: ScopeCatalog) -> None:
    assert catalog.effective(["write"]) == {"read", "write"}


def test_delete_is_reserved_but_grantable(catalog: ScopeCatalog) -> None:
    assert catalog.scopes["delete"].reserved
    assert catalog.effective(["delete"]) == {"delete"}


def test_resource_catalog_ships_with_admin_implying_read() -> None:
    resources = load_catalog(RESOURCES)
    assert set(resources.scopes) == {
        "workspaces:read",
        "workspaces:admin",
        "projects:read",
        "projects:admin",
        "work_items:read",
        "work_items:write",
        "design_model:read",
        "design_model:write",
    }
    assert resources.effective(["projects:admin"]) == {"projects:admin", "projects:read"}


def test_catalog_with_unknown_implication_names_it(tmp_path: Path) -> None:
    path = tmp_path / "scopes.toml"
    path.write_text('[scopes.write]\nimplies = ["raed"]\n')
    with pytest.raises(ConfigError, match="raed"):
        load_catalog(path)


def test_unknown_required_scope_is_a_caller_bug(catalog: ScopeCatalog) -> None:
    with pytest.raises(InvalidArgument, match="'admin' is not in the scope catalog"):
        catalog.check_required("admin")


CASES = [
    ("unknown key", None, "read", Reason.UNKNOWN_KEY, 401),
    ("revoked", key(revoke_time=NOW - timedelta(hours=1)), "read", Reason.REVOKED, 401),
    ("revoked wins over expired", key(revoke_time=NOW, expire_time=NOW - timedelta(hours=1)), "", Reason.REVOKED, 401),
    ("expired", key(expire_time=NOW - timedelta(seconds=1)), "read", Reason.EXPIRED, 401),
    ("expires exactly now", key(expire_time=NOW), "read", Reason.EXPIRED, 401),
    ("lacks scope", key(scopes=("read",)), "write", Reason.INSUFFICIENT_SCOPE, 403),
    ("implied scope", key(scopes=("write",)), "read", Reason.OK, 200),
    ("granted scope", key(scopes=("read",)), "read", Reason.OK, 200),
    ("authenticate only", key(scopes=("read",)), "", Reason.OK, 200),
    ("not yet expired", key(expire_time=NOW + timedelta(seconds=1)), "write", Reason.OK, 200),
]


@pytest.mark.parametrize(("case", "record", "scope", "reason", "status"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(
    catalog: ScopeCatalog, case: str, record: ApiKey | None, scope: str, reason: Reason, status: int
) -> None:
    grant = KeyGrant.of(record, catalog) if record is not None else None
    decision = decide(grant, scope, NOW.timestamp())
    assert decision.reason is reason
    assert decision.http_status == status
    assert decision.allowed is (status == 200)
    # The principal is known whenever the key was identified, denied or not.
    assert (decision.principal is not None) is (record is not None)


def test_every_reason_has_an_http_status() -> None:
    assert {r for r in Reason if r is not Reason.UNSPECIFIED} == set(HTTP_STATUS)
    assert HTTP_STATUS[Reason.RATE_LIMITED] == 429
