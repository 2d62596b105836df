"""Issue 14: ReportLeakedKeys through real channels to replicas on the real PostgreSQL.

The reporting replica has an admin token configured and the report carries
none: possession of a key is the proof, as for Authorize.
"""

from __future__ import annotations

import logging
import time

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.access import AdminToken
from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.core.manager import LEAK_REPORTS_PER_MINUTE
from tests.grpc.test_hotpath import until
from tests.grpc.test_lifecycle import authorize, code_of, create
from tests.replicas import running
from tests.support import ADMIN, Stub, new_org

PROTECTED = {"admin_tokens": (AdminToken("ci-deployer", "leak-test-token-0123456789"),)}


def report(keys: list[str], source: str = "github", url: str = "") -> pb.ReportLeakedKeysRequest:
    return pb.ReportLeakedKeysRequest(keys=keys, source=source, url=url)


async def test_a_reported_key_is_revoked_at_once_and_denied_on_another_replica(
    stub: Stub, settings: Settings, database_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    org = new_org()
    leaked = await create(stub, org)
    revoked_before = await create(stub, org)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=revoked_before.key.id, actor=ADMIN, reason="old"))
    untouched = await create(stub, org)
    assert (await authorize(stub, leaked.secret)).allowed  # cached as allowed on this replica
    unknown = KeyFormat("authsvc").generate().secret
    malformed = leaked.secret[:-1] + ("A" if leaked.secret[-1] != "A" else "B")
    async with running(settings, database_url, **PROTECTED) as (_, reporter):
        caplog.set_level(logging.INFO, logger="authsvc")
        answer = await reporter.ReportLeakedKeys(
            report(
                [leaked.secret, leaked.secret, revoked_before.secret, unknown, malformed],
                url="https://github.com/acme/app/blob/main/.env",
            ),
            timeout=10,
        )
    assert (answer.revoked, answer.already_revoked, answer.unknown) == (1, 1, 2)
    started = time.monotonic()

    async def denied() -> bool:
        return (await authorize(stub, leaked.secret)).reason == pb.REASON_REVOKED

    await until(denied)
    assert time.monotonic() - started < 1.0  # the freshness bound is 100 ms; a loaded machine gets slack
    assert (await authorize(stub, untouched.secret)).allowed
    row = await db.fetchrow("SELECT revoked_by, revoke_reason FROM api_keys WHERE id = $1::uuid", leaked.key.id)
    assert row["revoked_by"] == "leak-report"
    assert row["revoke_reason"] == "leaked: reported via github at https://github.com/acme/app/blob/main/.env"
    assert await db.fetchval("SELECT revoke_reason FROM api_keys WHERE id = $1::uuid", revoked_before.key.id) == "old"
    audit = await db.fetch(
        "SELECT actor_user_id, outcome, key_id::text FROM audit_events WHERE org_id = $1 AND action = 'key.revoke' "
        "AND actor_user_id = 'leak-report' ORDER BY id",
        org,
    )
    assert sorted((r["key_id"], r["outcome"]) for r in audit) == sorted(
        [(leaked.key.id, "ok"), (revoked_before.key.id, "already_revoked")]
    )
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "leaked key revoked" in logged and leaked.key.prefix in logged
    for secret in (leaked.secret, revoked_before.secret, unknown, malformed):
        assert secret not in logged and secret not in str(answer)


@pytest.mark.parametrize(
    ("copies", "source", "url", "named"),
    [
        (0, "github", "", "keys must list at least one"),
        (101, "github", "", "keys must list at most 100"),
        (1, "", "", "source is required"),
        (1, "g" * 201, "", "source must be at most 200"),
        (1, "git\nhub", "", "source must not contain control characters"),
        (1, "github", "https://x/" + "a" * 500, "url must be at most 500"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_revokes_nothing(
    stub: Stub, db: asyncpg.Connection, copies: int, source: str, url: str, named: str
) -> None:
    created = await create(stub, new_org())
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    code, message = await code_of(stub.ReportLeakedKeys(report([created.secret] * copies, source, url), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in message
    assert created.secret not in message
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before
    assert (await authorize(stub, created.secret)).allowed


async def test_a_key_in_the_source_is_refused_not_stored(stub: Stub, db: asyncpg.Connection) -> None:
    created = await create(stub, new_org())
    code, message = await code_of(stub.ReportLeakedKeys(report([created.secret], source=created.secret)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "source holds an API key" in message
    assert created.secret not in message
    assert (await authorize(stub, created.secret)).allowed


async def test_reports_are_rate_limited_per_caller_address(settings: Settings, database_url: str) -> None:
    """At most LEAK_REPORTS_PER_MINUTE calls per address in a minute window (two windows if the test straddles one)."""
    async with running(settings, database_url, **PROTECTED) as (_, replica):
        codes = []
        message = ""
        for _ in range(2 * LEAK_REPORTS_PER_MINUTE + 5):
            try:
                await replica.ReportLeakedKeys(report(["authsvc_not_a_key"]), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                message = exc.details() or ""
        # The first calls all pass; exactly the limit within one window, up to twice that if they straddle two.
        assert codes[:LEAK_REPORTS_PER_MINUTE] == [grpc.StatusCode.OK] * LEAK_REPORTS_PER_MINUTE
        assert codes.count(grpc.StatusCode.OK) <= 2 * LEAK_REPORTS_PER_MINUTE
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert f"at most {LEAK_REPORTS_PER_MINUTE} leak reports a minute" in message
