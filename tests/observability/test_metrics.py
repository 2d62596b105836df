"""The metrics a replica exports, counted through real calls: a real server, a real channel, real PostgreSQL.

Each test starts its own replica (fresh counts) on the session database and
reads what Prometheus would scrape: the exposition text of
``authsvc.metrics.Collector``, parsed back by prometheus-client's parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.metrics import Collector
from authsvc.runtime import App
from authsvc.storage.postgres import NOTIFY_CHANNEL
from tests.replicas import running
from tests.support import ADMIN, Stub, TcpProxy, new_org

NAMES = {
    "authsvc_authorize_total",
    "authsvc_authorize_duration_seconds",
    "authsvc_cache_entries",
    "authsvc_cache_hits_total",
    "authsvc_cache_misses_total",
    "authsvc_invalidation_lag_seconds",
    "authsvc_invalidation_feed_up",
    "authsvc_invalidation_feed_resets_total",
    "authsvc_usage_report_entries_dropped_total",
    "authsvc_known_digests_loaded",
    "authsvc_store_lookup_batch_size",
    "authsvc_store_errors_total",
    "authsvc_db_pool_connections",
    "authsvc_ratelimit_fallback_total",
    "authsvc_management_requests_total",
    "authsvc_build_info",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(app: App) -> tuple[str, Samples]:
    """The exposition text of this replica and its samples by (name, labels)."""
    metrics = app.metrics
    assert metrics is not None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: [metrics.snapshot()]))
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def replica(settings: Settings, database_url: str, **overrides: Any) -> AbstractAsyncContextManager[tuple[App, Stub]]:
    """A fresh replica; the tests count exact outcomes, so a busy machine gets 2 s per lookup, not 100 ms."""
    return running(settings, database_url, **{"store_timeout_ms": 2000, **overrides})


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the call succeeded")


async def test_every_metric_is_exported_with_its_exact_name_and_counts_what_was_sent(
    settings: Settings, database_url: str
) -> None:
    async with replica(settings, database_url) as (app, stub):
        org = new_org()
        created = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]))
        unknown = KeyFormat("authsvc").generate().secret
        sent = [
            (created.secret, "read"),  # ok, from the store
            (created.secret, "read"),  # ok, cached
            (created.secret, "read"),  # ok, cached
            (created.secret, "write"),  # insufficient scope, cached
            ("", "read"),  # missing: no lookup
            ("authsvc_not-a-key", "read"),  # malformed: no lookup
            (unknown, "read"),  # unknown, from the store
        ]
        for key, scope in sent:
            await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope=scope))
        assert await code_of(stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="nope"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
        revoked = await stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read"))
        assert revoked.reason == pb.REASON_REVOKED
        nobody = pb.Actor(user_id="x", role=pb.ROLE_UNSPECIFIED)
        assert await code_of(stub.GetKey(pb.GetKeyRequest(org_id=org, actor=nobody, key_id=created.key.id))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # Both notifications (create, revoke) reach this replica's own listener too.
        await eventually(lambda: value(scrape(app)[1], "authsvc_invalidation_lag_seconds_count") == 2)
        await eventually(lambda: value(scrape(app)[1], "authsvc_known_digests_loaded") == 1)
        text, samples = scrape(app)

    families = {f.name for f in text_string_to_metric_families(text)}
    # The parser drops _total from counter family names; compare on what a query uses.
    assert {n.removesuffix("_total") for n in NAMES} <= families
    assert value(samples, "authsvc_build_info", version="0.1.0") == 1
    expected = {
        "ok": 3,
        "insufficient_scope": 1,
        "missing_key": 1,
        "malformed_key": 1,
        "unknown_key": 1,
        "revoked": 1,
        "invalid_argument": 1,
    }
    got = {
        dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "authsvc_authorize_total" and v
    }
    assert got == expected
    assert all(dict(labels)["transport"] == "grpc" for (name, labels) in samples if name == "authsvc_authorize_total")
    # Six calls looked a key up. The first ok, the unknown key and the revoked key (evicted on revoke)
    # must read the store; the other three are hits, unless a busy machine delayed the listener's
    # heartbeat past its 1 s freshness bound, when the cache is bypassed (fail closed) and they miss too.
    hits, misses = value(samples, "authsvc_cache_hits_total"), value(samples, "authsvc_cache_misses_total")
    assert hits + misses == 6 and misses >= 3
    assert value(samples, "authsvc_authorize_duration_seconds_count", transport="grpc", cache="miss") == misses
    # cache="hit" also holds the answers that needed no lookup: missing, malformed, invalid_argument.
    assert value(samples, "authsvc_authorize_duration_seconds_count", transport="grpc", cache="hit") == hits + 3
    fast = value(samples, "authsvc_authorize_duration_seconds_bucket", transport="grpc", cache="hit", le="0.01")
    assert fast >= 1  # a cache hit takes well under 10 ms
    assert value(samples, "authsvc_store_lookup_batch_size_count") == misses  # one lookup at a time here
    assert value(samples, "authsvc_cache_entries") >= 1
    assert value(samples, "authsvc_invalidation_feed_up") == 1
    assert value(samples, "authsvc_invalidation_feed_resets_total") == 0
    assert value(samples, "authsvc_known_digests_loaded") == 1
    assert value(samples, "authsvc_invalidation_lag_seconds_sum") < 2  # seconds, for two local notifications
    assert value(samples, "authsvc_management_requests_total", method="CreateKey", code="OK") == 1
    assert value(samples, "authsvc_management_requests_total", method="RevokeKey", code="OK") == 1
    assert value(samples, "authsvc_management_requests_total", method="GetKey", code="PERMISSION_DENIED") == 1
    assert (
        value(samples, "authsvc_db_pool_connections", state="idle")
        + value(samples, "authsvc_db_pool_connections", state="in_use")
        >= 1
    )
    assert value(samples, "authsvc_ratelimit_fallback_total") == 0
    # No key material or identifiers, in any label or value.
    for secret in (created.secret, unknown, created.secret[12:], created.key.prefix, created.key.id, org):
        assert secret not in text


async def test_envoy_checks_are_counted_under_their_own_transport(settings: Settings, database_url: str) -> None:
    from envoy.service.auth.v3 import external_auth_pb2 as ext
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    async with replica(settings, database_url) as (app, stub):
        created = await stub.CreateKey(pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"]))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel)
            for headers in ({"x-api-key": created.secret}, {}):
                request = ext.CheckRequest()
                request.attributes.request.http.method = "GET"
                request.attributes.request.http.headers.update(headers)
                await check.Check(request)
        _, samples = scrape(app)
    assert value(samples, "authsvc_authorize_total", reason="ok", transport="envoy_grpc") == 1
    assert value(samples, "authsvc_authorize_total", reason="missing_key", transport="envoy_grpc") == 1


async def test_a_store_outage_shows_as_unavailable_store_errors_and_a_down_feed(
    settings: Settings, database_url: str
) -> None:
    """Through a TCP hop that the test cuts: the shared database itself is never touched."""
    proxy = TcpProxy.for_database(database_url)
    try:
        async with replica(settings, proxy.url_for(database_url), cache_size=0, store_timeout_ms=100) as (app, stub):
            unknown = KeyFormat("authsvc").generate().secret
            proxy.cut()
            for _ in range(3):
                code = await code_of(stub.Authorize(pb.AuthorizeRequest(key=unknown, required_scope="read")))
                assert code == grpc.StatusCode.UNAVAILABLE
            await eventually(lambda: value(scrape(app)[1], "authsvc_invalidation_feed_up") == 0)
            await eventually(lambda: value(scrape(app)[1], "authsvc_invalidation_feed_resets_total") >= 1)
            _, samples = scrape(app)
            assert value(samples, "authsvc_authorize_total", reason="unavailable", transport="grpc") == 3
            assert value(samples, "authsvc_store_errors_total", operation="lookup") >= 1
            proxy.restore()
            await eventually(lambda: value(scrape(app)[1], "authsvc_invalidation_feed_up") == 1, within=10)
    finally:
        proxy.close()


async def test_notifications_in_the_old_format_still_evict_and_are_not_timed(
    settings: Settings, database_url: str, db: asyncpg.Connection
) -> None:
    """A bare hex digest (an older authsvc publishing) evicts as before; only the new format carries a commit time."""
    async with replica(settings, database_url) as (app, stub):
        created = await stub.CreateKey(pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"]))
        await eventually(lambda: value(scrape(app)[1], "authsvc_invalidation_lag_seconds_count") == 1)
        assert (await stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read"))).allowed
        entries = len(app.authorizer.cache or ())
        from authsvc.core.keyformat import digest

        await db.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, digest(created.secret).hex())
        await eventually(lambda: len(app.authorizer.cache or ()) == entries - 1)
        await asyncio.sleep(0.1)
        assert value(scrape(app)[1], "authsvc_invalidation_lag_seconds_count") == 1
