"""Infrastructure faults are UNAVAILABLE (or ABORTED: retry), never INTERNAL, and leave no traceback.

``authsvc serve`` runs as a process on a PostgreSQL cluster of this module's
own (``tests.own_postgres``), which the tests kill connections of,
reconfigure and make raise errors; the shared servers are never touched.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc.core.keyformat import KeyFormat
from tests.own_postgres import own_postgres
from tests.support import ADMIN, MEMBER, ServerProcess, Stub, new_org, serve_process, wait_serving

pytestmark = pytest.mark.slow

# What a caller may see while the database is being knocked over: answers,
# or the two codes that say "not now". INTERNAL or UNKNOWN would be a bug.
INFRASTRUCTURE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


@contextlib.contextmanager
def authsvc_on_own_postgres(tmp: Path) -> Iterator[tuple[ServerProcess, str]]:
    with own_postgres() as url, serve_process({"AUTHSVC_DATABASE_URL": url}, tmp) as server:
        yield server, url


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _kill_backends(url: str, stop: asyncio.Event, kills: list[int]) -> None:
    """Terminate every other backend (authsvc's pool and listener) every 10 ms, as an operator would."""
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            killed = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            kills.append(int(killed))
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def _serving_again(target: str) -> bool:
    """Polls health for up to 15 s."""
    deadline = time.monotonic() + 15
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.1)
    return False


async def _allowed_soon(stub: Stub, secret: str) -> bool:
    """Polls Authorize for up to 10 s until it allows ``secret``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError):
            if (await stub.Authorize(pb.AuthorizeRequest(key=secret, required_scope="read"), timeout=2)).allowed:
                return True
        await asyncio.sleep(0.1)
    return False


async def test_killed_database_connections_answer_unavailable_never_internal(tmp_path: Path) -> None:
    """pg_terminate_backend on every backend, every 10 ms, for 6 s, under a stream of calls of every kind.

    asyncpg then raises, among others, ``InternalClientError: cannot switch to
    state 12; another operation is in progress``, which used to be INTERNAL
    with a traceback in the log.
    """
    with authsvc_on_own_postgres(tmp_path) as (server, url):
        codes: collections.Counter[tuple[str, grpc.StatusCode]] = collections.Counter()
        kills: list[int] = []
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            org = new_org()
            existing = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="x", scopes=["read"]))
            stop = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    own = new_org()  # one org each round: the active-key limit never interferes
                    calls = {
                        "CreateKey": stub.CreateKey(
                            pb.CreateKeyRequest(org_id=own, actor=ADMIN, name="x", scopes=["read"]), timeout=10
                        ),
                        "GetKey": stub.GetKey(
                            pb.GetKeyRequest(org_id=org, key_id=existing.key.id, actor=MEMBER), timeout=10
                        ),
                        "ListKeys": stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER), timeout=10),
                        "RevokeKey": stub.RevokeKey(
                            pb.RevokeKeyRequest(org_id=org, key_id=existing.key.id, actor=ADMIN), timeout=10
                        ),
                        # A new unknown key every time: a miss that reads the database.
                        "Authorize": stub.Authorize(
                            pb.AuthorizeRequest(key=KeyFormat("authsvc").generate().secret, required_scope="read"),
                            timeout=10,
                        ),
                    }
                    results = await asyncio.gather(*(_code(c) for c in calls.values()))
                    codes.update(zip(calls, results, strict=True))

            killer = asyncio.create_task(_kill_backends(url, stop, kills))
            streams = [asyncio.create_task(stream()) for _ in range(4)]
            await asyncio.sleep(6)
            stop.set()
            await asyncio.gather(killer, *streams)

        seen = {code for _, code in codes}
        fine = INFRASTRUCTURE_CODES | {grpc.StatusCode.OK}
        wrong = {call: n for (call, code), n in codes.items() if code not in fine}
        assert not wrong, f"calls answered neither OK nor UNAVAILABLE/ABORTED: {wrong} (all: {dict(codes)})"
        assert grpc.StatusCode.UNAVAILABLE in seen, f"the faults were never hit: {dict(codes)}"
        assert sum(kills) > 50, kills  # the killer really killed, many times
        assert await _serving_again(server.target)  # and it recovers by itself
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
        assert "database call failed" in log  # one line, naming the kind of fault
        print(f"calls by code: {dict(codes)}; backends killed: {sum(kills)}")


# SQLSTATEs raised by the real server, one org each --------------------------

# A trigger makes PostgreSQL itself raise the SQLSTATE in an org's name when
# authsvc writes that org's audit row, so each condition comes through the
# real driver, mid-transaction, exactly as from a real server in that state.
_RAISING_TRIGGER = """
CREATE FUNCTION authsvc_test_raise() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.org_id LIKE 'raise-%' THEN
        RAISE EXCEPTION 'raised by the test' USING ERRCODE = substr(NEW.org_id, 7, 5);
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER authsvc_test_raise BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION authsvc_test_raise();
"""

SQLSTATES = [
    ("40001", "serialization_failure", grpc.StatusCode.ABORTED),
    ("40P01", "deadlock_detected", grpc.StatusCode.ABORTED),
    ("25006", "read_only_sql_transaction", grpc.StatusCode.UNAVAILABLE),
    ("53300", "too_many_connections", grpc.StatusCode.UNAVAILABLE),
    ("53100", "disk_full", grpc.StatusCode.UNAVAILABLE),
    ("57P01", "admin_shutdown", grpc.StatusCode.UNAVAILABLE),
    ("57014", "query_canceled", grpc.StatusCode.UNAVAILABLE),
    ("58030", "io_error", grpc.StatusCode.UNAVAILABLE),
    ("08006", "connection_failure", grpc.StatusCode.UNAVAILABLE),
]


@pytest.fixture(scope="module")
def raising(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    with authsvc_on_own_postgres(tmp_path_factory.mktemp("raising")) as (server, url):

        async def install() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(_RAISING_TRIGGER)
            finally:
                await conn.close()

        asyncio.run(install())
        yield server, url


@pytest.mark.parametrize(("sqlstate", "name", "expected"), SQLSTATES, ids=[s[1] for s in SQLSTATES])
async def test_database_conditions_map_to_unavailable_or_aborted_and_write_nothing(
    raising: tuple[ServerProcess, str], sqlstate: str, name: str, expected: grpc.StatusCode
) -> None:
    server, url = raising
    org = f"raise-{sqlstate}-{new_org()}"
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        code = await _code(stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="x", scopes=["read"])))
        assert code == expected
        code = await _code(stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER)))  # audit row after a read
        assert code == expected
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 0  # rolled back
    finally:
        await conn.close()
    wait_serving(server.target, timeout=15)  # the server is fine; the next calls get fresh connections
    log = server.log()
    assert "Traceback" not in log
    assert f"SQLSTATE {sqlstate}" in log


async def test_a_read_only_database_makes_every_call_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    """A primary put in read-only mode is no writable primary: writes and Authorize are UNAVAILABLE, never INTERNAL.

    authsvc trusts its cache only while it follows the writable primary
    (see server/test_failover.py), so reads fail closed too; nothing is half done.
    """
    with authsvc_on_own_postgres(tmp_path) as (server, url):
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            org = new_org()
            created = await stub.CreateKey(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="x", scopes=["read"]))
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
                # Every authsvc connection reconnects and comes back read-only.
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                keys_before = await conn.fetchval("SELECT count(*) FROM api_keys")
                another = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="y", scopes=["read"])
                calls = {
                    "CreateKey": stub.CreateKey(another),
                    "RevokeKey": stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN)),
                    "GetKey": stub.GetKey(pb.GetKeyRequest(org_id=org, key_id=created.key.id, actor=MEMBER)),
                    "Authorize": stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read")),
                }
                for call, pending in calls.items():
                    assert await _code(pending) == grpc.StatusCode.UNAVAILABLE, call
                assert await conn.fetchval("SELECT count(*) FROM api_keys") == keys_before
                revoked = await conn.fetchval("SELECT revoke_time FROM api_keys WHERE id = $1::uuid", created.key.id)
                assert revoked is None
            finally:
                await conn.execute("ALTER DATABASE postgres RESET default_transaction_read_only")
                await conn.close()
        log = server.log()
        assert "Traceback" not in log
