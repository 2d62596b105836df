"""The client's decision cache (issue 12) against real authsvc servers on real ports.

Each test reads ``cache_stats()`` to know whether an answer was decided in
the client (a hit) or by authsvc (a miss), and asserts what a calling
service sees: the decision, or ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client import AsyncClient, Reason
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1.authsvc_pb2_grpc import KeyServiceStub
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Actor, Role
from authsvc.core.ports import NewKey
from authsvc.runtime import App
from tests.grpc.test_hotpath import kill_listener, until
from tests.replicas import running
from tests.support import ADMIN, Stub, new_org, serve_process


async def subscribed(client: AsyncClient) -> None:
    """Until the client's stream has heard a heartbeat (its cache may serve)."""

    async def ok() -> bool:
        return client.cache_stats().stream == "subscribed"

    await until(ok, within=10.0)


async def cached(client: AsyncClient, key: str, scope: str = "read") -> None:
    """Until ``key`` is decided in the client: a first call opens the stream, then wait for a hit."""
    await client.authorize(key, scope)
    await subscribed(client)

    async def hit() -> bool:
        before = client.cache_stats().hits
        await client.authorize(key, scope)
        return client.cache_stats().hits > before

    await until(hit, within=10.0)


async def new_key(stub: Stub, org: str, scopes: tuple[str, ...] = ("read",), **kw: object) -> pb.CreateKeyResponse:
    request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="cached", scopes=scopes, **kw)  # type: ignore[arg-type]
    return await stub.CreateKey(request)


async def test_a_known_key_is_decided_in_the_client_for_any_scope_with_the_servers_rules(app: App, stub: Stub) -> None:
    """After one call, a key's answer for any scope authsvc accepted comes from the client, with the same reasons."""
    org = new_org()
    reader = await new_key(stub, org, ("read",))
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        first = await client.authorize(reader.secret, "write")  # authsvc decides, and accepts the scope "write"
        assert first.reason is Reason.INSUFFICIENT_SCOPE
        await cached(client, reader.secret)
        hits = client.cache_stats().hits
        allowed = await client.authorize(reader.secret, "read")
        denied = await client.authorize(reader.secret, "write")
        assert client.cache_stats().hits == hits + 2, "both answers should come from the client's cache"
        assert allowed.allowed and allowed.principal is not None and allowed.principal.key_id == reader.key.id
        assert (denied.reason, denied.http_status) == (Reason.INSUFFICIENT_SCOPE, 403)
        assert denied.principal == allowed.principal
        stats = client.cache_stats()
        assert stats.entries >= 1 and stats.stream == "subscribed"


async def test_a_scope_authsvc_never_accepted_still_goes_to_authsvc(app: App, stub: Stub) -> None:
    """An unknown scope stays authsvc's INVALID_ARGUMENT even for a cached key."""
    from authsvc_client import InvalidArgument

    reader = await new_key(stub, new_org())
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        await cached(client, reader.secret)
        with pytest.raises(InvalidArgument):
            await client.authorize(reader.secret, "no-such-scope")


async def test_cache_size_zero_sends_every_call(app: App, stub: Stub) -> None:
    reader = await new_key(stub, new_org())
    async with AsyncClient(f"127.0.0.1:{app.port}", cache_size=0) as client:
        for _ in range(3):
            assert (await client.authorize(reader.secret, "read")).allowed
        assert client.cache_stats().stream == "off" and client.cache_stats().hits == 0


async def test_a_cached_allow_becomes_a_denial_after_a_revocation_on_another_replica(
    app: App, stub: Stub, settings: Settings, database_url: str
) -> None:
    org = new_org()
    key = await new_key(stub, org)
    async with running(settings, database_url) as (_, replica), AsyncClient(f"127.0.0.1:{app.port}") as client:
        await cached(client, key.secret)
        await replica.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key.key.id, actor=ADMIN, reason="test"))
        start = time.monotonic()

        async def denied() -> bool:
            return (await client.authorize(key.secret, "read")).reason is Reason.REVOKED

        await until(denied, within=2.0)
        took = time.monotonic() - start
        # Once denied, denied for good: locally (revocation is final) and never an allow again.
        for _ in range(200):
            assert (await client.authorize(key.secret, "read")).reason is Reason.REVOKED
        assert took < 1.0, f"revocation reached the client after {took:.3f} s"


async def test_a_key_created_after_a_negative_entry_is_allowed_at_once(app: App) -> None:
    issued = KeyFormat("authsvc").generate()
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        assert (await client.authorize(issued.secret, "read")).reason is Reason.UNKNOWN_KEY
        await cached(client, issued.secret)  # "no such key" is now decided in the client
        assert (await client.authorize(issued.secret, "read")).reason is Reason.UNKNOWN_KEY
        # CreateKey's own code path, with a secret this test knows in advance.
        await app.store.create_key(
            NewKey(new_org(), "late", issued.display_prefix, issued.digest, ("read",), "alice", None, 0),
            Actor("alice", Role.ADMIN),
            10,
            datetime.now(UTC),
        )

        async def allowed() -> bool:
            return (await client.authorize(issued.secret, "read")).allowed

        start = time.monotonic()
        await until(allowed, within=2.0)
        assert time.monotonic() - start < 1.0


async def test_a_rate_limited_key_always_reaches_authsvc_and_the_limit_holds_across_clients(
    app: App, stub: Stub
) -> None:
    """Three clients (own channels, own caches), a limit of 6: exactly 6 allowed, none decided in a client."""
    key = await new_key(stub, new_org(), rate_limit=6)
    clients = [AsyncClient(f"127.0.0.1:{app.port}") for _ in range(3)]
    try:
        for client in clients:
            await client.authorize(key.secret, "read")  # opens the stream too
        for client in clients:
            await subscribed(client)
        outcomes = [(await c.authorize(key.secret, "read")).reason for _ in range(5) for c in clients]
        # 18 calls in all, three of them above: exactly 6 allowed (unless a 60 s window turned meanwhile).
        assert outcomes.count(Reason.OK) == 6 - 3
        assert outcomes.count(Reason.RATE_LIMITED) == 15 - 3
        assert all(c.cache_stats().hits == 0 for c in clients), "a rate-limited key must never be decided locally"
    finally:
        for client in clients:
            await client.close()


async def test_expiry_is_checked_on_every_hit_at_the_exact_time(app: App, stub: Stub) -> None:
    expire_at = datetime.now(UTC) + timedelta(seconds=3)
    stamp = Timestamp()
    stamp.FromDatetime(expire_at)
    key = await new_key(stub, new_org(), expire_time=stamp)
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        await cached(client, key.secret)
        seen: list[tuple[float, Reason]] = []
        while time.time() < expire_at.timestamp() + 0.3:
            before = client.cache_stats().hits
            decision = await client.authorize(key.secret, "read")
            now = time.time()
            if client.cache_stats().hits > before:
                seen.append((now, decision.reason))
            await asyncio.sleep(0.002)
        assert any(r is Reason.OK for _, r in seen) and any(r is Reason.EXPIRED for _, r in seen)
        # Decided in the client: expired from expire_time on (``now`` is read after the decision, so an
        # allow is never later than it), never an allow after it.
        assert all(reason is Reason.EXPIRED for at, reason in seen if at >= expire_at.timestamp() + 0.001)
        assert all(reason is Reason.OK for at, reason in seen if at < expire_at.timestamp() - 0.05)


async def test_last_used_time_moves_for_calls_decided_in_the_client(
    app: App, stub: Stub, db: asyncpg.Connection
) -> None:
    key = await new_key(stub, new_org())
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        await cached(client, key.secret)
        await asyncio.sleep(1.0)  # the server's own record of these calls is flushed by now
        first = await db.fetchval("SELECT last_used_time FROM api_keys WHERE id = $1", key.key.id)
        local_call = datetime.now(UTC)
        hits = client.cache_stats().hits
        assert (await client.authorize(key.secret, "read")).allowed
        assert client.cache_stats().hits == hits + 1

        async def moved() -> bool:
            value = await db.fetchval("SELECT last_used_time FROM api_keys WHERE id = $1", key.key.id)
            return value is not None and value >= local_call and value != first

        # Reports every 2 s, flushes every 0.2 s here: well inside the 5 s contract.
        await until(moved, within=5.0)


async def test_a_reset_from_the_server_empties_the_client_cache(
    settings: Settings, database_url: str, db: asyncpg.Connection
) -> None:
    """Killing the server's listener backend: the server resets its streams, the client drops every entry."""
    async with running(settings, database_url) as (replica_app, replica):
        key = await new_key(replica, new_org())
        async with AsyncClient(f"127.0.0.1:{replica_app.port}") as client:
            await cached(client, key.secret)
            resets = client.cache_stats().resets
            await kill_listener(replica_app, db)

            async def reset_seen() -> bool:
                return client.cache_stats().resets > resets

            await until(reset_seen, within=5.0)
            assert client.cache_stats().entries == 0 or client.cache_stats().resets > resets + 1
            await cached(client, key.secret)  # and it fills again once the server's feed is back


async def test_a_dropped_stream_reconnects_and_the_client_starts_again_from_empty(app: App, stub: Stub) -> None:
    """What a slow client gets when the server drops it (RESOURCE_EXHAUSTED): a new stream, an empty cache."""
    key = await new_key(stub, new_org())
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        await cached(client, key.secret)
        connects = client.cache_stats().connects
        app.fanout.drop_all("test: a slow client")

        async def reconnected() -> bool:
            return client.cache_stats().connects > connects

        await until(reconnected, within=5.0)
        stats = client.cache_stats()
        assert stats.entries == 0, "a reconnected client starts from an empty cache"
        hits = stats.hits
        await cached(client, key.secret)
        assert client.cache_stats().hits > hits


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut", "partition"])
async def test_a_cut_or_partitioned_connection_leaves_no_cached_allow_after_the_bound(
    fault: str, app: App, stub: Stub
) -> None:
    """Through a real TCP hop: connections reset (cut) or silently holding every byte (partition)."""
    from authsvc_client import Unavailable

    from tests.support import TcpProxy

    key = await new_key(stub, new_org())
    proxy = TcpProxy(("127.0.0.1", app.port))
    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}") as client:
            await cached(client, key.secret)
            at = time.monotonic()
            if fault == "cut":
                proxy.cut()
            else:
                proxy.freeze()
            seen: list[tuple[float, str]] = []
            while time.monotonic() - at < 2.0:
                try:
                    out = "allow" if (await client.authorize(key.secret, "read")).allowed else "deny"
                except Unavailable:
                    out = "unavailable"
                seen.append((time.monotonic() - at, out))
                await asyncio.sleep(0.005)
            late = [t for t, out in seen if out == "allow" and t > 1.0 + 0.15]
            assert not late, f"allowed {late[0]:.3f} s after the {fault}"
            assert seen[-1][1] == "unavailable"
    finally:
        proxy.close()


def _client_script(target: str, key: str) -> str:
    return f"""
import sys, time
from authsvc_client import Client, Unavailable
client = Client({target!r})
while True:
    t = time.monotonic()
    try:
        d = client.authorize({key!r}, "read")
        out = "allow" if d.allowed else "deny"
    except Unavailable:
        out = "unavailable"
    print(f"{{time.time():.4f}} {{out}} {{client.cache_stats().hits}} {{client.cache_stats().stream}}", flush=True)
    time.sleep(0.005)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_lost_or_frozen_server_leaves_no_cached_allow_after_the_bound(
    fault: str, database_url: str, tmp_path: Path
) -> None:
    """A blocking client in its own process: after SIGKILL or SIGSTOP of authsvc, only Unavailable.

    Killed: the stream ends at once, so the next call goes to the dead server (bound 1.5 s, measured less).
    Frozen: heartbeats stop, so no cached allow more than 1 s after the last one (plus one call's deadline).
    """
    with serve_process({"AUTHSVC_DATABASE_URL": database_url}, tmp_path) as server:
        stub_channel = grpc.insecure_channel(server.target)
        created = KeyServiceStub(stub_channel).CreateKey(
            pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="c", scopes=["read"]), timeout=10
        )
        stub_channel.close()
        proc = subprocess.Popen(
            [sys.executable, "-c", _client_script(server.target, created.secret)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ},
        )
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 15
            for line in proc.stdout:  # until the client decides locally
                _, out, hits, stream = line.split()
                if out == "allow" and int(hits) > 0 and stream == "subscribed":
                    break
                assert time.monotonic() < deadline, "client cache never served"
            at = time.time()
            server.proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            lines: list[tuple[float, str]] = []
            for line in proc.stdout:
                t, out, _, _ = line.split()
                lines.append((float(t), out))
                if float(t) > at + 2.0:
                    break
            bound = 1.5 if fault == "kill" else 1.0 + 0.3
            late_allows = [t - at for t, out in lines if out == "allow" and t > at + bound]
            assert not late_allows, f"allowed {late_allows[0]:.3f} s after the {fault}"
            assert lines[-1][1] == "unavailable"
            first_unavailable = next(t - at for t, out in lines if out == "unavailable")
            assert first_unavailable < bound
        finally:
            proc.kill()
            proc.wait()
            if fault == "freeze":
                server.proc.send_signal(signal.SIGCONT)
