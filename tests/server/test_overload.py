"""Issue 10, overload: ``authsvc serve`` stays fast and answers everyone when pushed past what it can do.

Every test runs a real server process and talks to it over real sockets.
Slow work is made slow for real: a transaction of the test's own holds an
ACCESS EXCLUSIVE lock on ``api_keys``, so lookups of keys the cache does not
know wait in PostgreSQL while the invalidation feed (which never reads that
table) stays live and cached keys stay fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2  # type: ignore[import-untyped]  # googleapis-common-protos ships no stubs

from authsvc.config import Settings
from authsvc.core.keyformat import KeyFormat
from authsvc.core.known import SUSPECT_BURST, SUSPECT_RATE, UNKNOWN_KEYS
from authsvc.storage.postgres import STORE_UNAVAILABLE
from tests.extauthz.rawhttp import ask
from tests.support import (
    ADMIN,
    ServerProcess,
    Stub,
    TcpProxy,
    closed_within,
    free_port,
    free_port_range,
    new_org,
    serve_process,
    wait_serving,
)

FORGED = KeyFormat("authsvc")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def key_request() -> pb.CreateKeyRequest:
    """A read key in an organization of its own (so no test meets the 10-key limit)."""
    return pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="overload", scopes=["read"])


def create_key(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = authsvc_pb2_grpc.KeyServiceStub(channel).CreateKey(key_request(), timeout=10)
        return str(reply.secret)


async def stored_keys(stub: Stub, n: int) -> list[str]:
    """``n`` keys the server stores but has never looked up: cache misses, and not suspects (``core.known``).

    Created a few at a time, so that a test's small admission bound does not refuse its own setup.
    """
    keys: list[str] = []
    while len(keys) < n:
        replies = await asyncio.gather(
            *(stub.CreateKey(key_request(), timeout=10) for _ in range(min(4, n - len(keys))))
        )
        keys += [reply.secret for reply in replies]
    return keys


async def table_loaded(server: ServerProcess) -> None:
    """Until the server's log says its table of stored digests is loaded: from then on forged keys are suspects."""
    async with asyncio.timeout(15):
        while not re.search(r"loaded \d+ stored key digests", server.log()):  # noqa: ASYNC110  # another process's file
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def lookups_blocked(database_url: str) -> AsyncIterator[None]:
    """Every read of ``api_keys`` waits until the block ends (a slow database, for real)."""
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def call(stub: Stub, key: str) -> tuple[str, float, str]:
    """(outcome, seconds, detail): outcome is an Authorize reason name or a status code name."""
    start = time.monotonic()
    try:
        reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, time.monotonic() - start, exc.details() or ""
    return pb.Reason.Name(reply.reason), time.monotonic() - start, ""


@pytest.mark.slow
async def test_calls_past_capacity_are_refused_at_once_with_unavailable_and_every_call_is_answered(
    tmp_path: Path, database_url: str
) -> None:
    """8 calls stuck in a slow lookup fill the worker; 300 more are refused at once, UNAVAILABLE, never INTERNAL.

    A cached key is allowed throughout, over Authorize and Envoy's Check: a hit
    never waits, so it needs no slot, and a flood of unknown keys that holds
    every slot cannot deny it.
    """
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_MAX_CONCURRENT_CALLS": "8",
        "AUTHSVC_STORE_TIMEOUT_MS": "8000",  # the stuck lookups outlast every probe, even on a loaded machine
        "AUTHSVC_MAX_QUEUED_CALLS": "4096",  # the core's queue out of the way: this test is about admission
    }
    with serve_process(env, tmp_path) as server:
        key = create_key(server.target)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: Stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            assert (await call(stub, key))[0] == "REASON_OK"
            misses = await stored_keys(stub, 309)
            async with lookups_blocked(database_url):
                stuck = [asyncio.create_task(call(stub, k)) for k in misses[:8]]
                await asyncio.sleep(0.5)  # all eight are in the worker, waiting for PostgreSQL
                flood = await asyncio.gather(*(call(stub, k) for k in misses[8:308]))
                cached_while_full = [await call(stub, key) for _ in range(20)]
                checks_while_full = [await envoy_check(channel, key) for _ in range(20)]
                check_miss_while_full = await envoy_check(channel, misses[308])
                still_stuck = not any(task.done() for task in stuck)  # the slots were full throughout
            stuck_results = await asyncio.gather(*stuck)
            after = await call(stub, key)
    assert {outcome for outcome, _, _ in flood} == {"UNAVAILABLE"}
    assert all("at capacity" in detail for _, _, detail in flood)
    assert max(seconds for _, seconds, _ in flood) < 1.0, sorted(s for _, s, _ in flood)[-5:]
    # Were hits to need a slot, every one of these would be UNAVAILABLE.
    assert still_stuck
    assert [outcome for outcome, _, _ in cached_while_full] == ["REASON_OK"] * 20
    assert [outcome for outcome, _, _ in checks_while_full] == [code_pb2.OK] * 20
    # Check's misses take a slot like Authorize's: refused at once, not after the 8 s lookup budget.
    outcome, seconds, detail = check_miss_while_full
    assert (outcome, "at capacity" in detail) == ("UNAVAILABLE", True) and seconds < 1.0
    # The stuck calls get their answer once the database answers: nothing was dropped or crashed.
    assert {outcome for outcome, _, _ in stuck_results} <= {"REASON_OK", "UNAVAILABLE"}
    assert after[0] == "REASON_OK"
    assert server.proc.poll() is not None  # stopped by serve_process, not crashed before
    assert "Traceback" not in server.log()


async def envoy_check(channel: grpc.aio.Channel, key: str) -> tuple[int | str, float, str]:
    """Envoy's gRPC Check of a GET with ``key`` in ``x-api-key``: (the answer's code, or the call's status
    name; seconds; the status details)."""
    request = ext.CheckRequest()
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.headers["x-api-key"] = key
    start = time.monotonic()
    try:
        reply = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, time.monotonic() - start, exc.details() or ""
    return int(reply.status.code), time.monotonic() - start, ""


async def http_check(port: int, key: str) -> tuple[int, float, bytes]:
    """Envoy's HTTP check for a GET with ``key``: (status, seconds, body)."""
    start = time.monotonic()
    answer = await ask(port, "GET", "/check/x", {"x-api-key": key})
    return answer.status, time.monotonic() - start, answer.body


def http_port(server: ServerProcess) -> int:
    return int(server.http_target.rpartition(":")[2])


#: What the HTTP check answers when the store cannot answer: the same 503, the same body.
STORE_OUTAGE = Settings().http_policy.unavailable


@pytest.mark.slow
async def test_http_cache_misses_past_capacity_get_503_at_once_and_service_recovers_after_the_store_thaws(
    tmp_path: Path, database_url: str
) -> None:
    """Envoy's HTTP check shares the worker's bound: 4 misses wait on a frozen store, 60 more get 503 at once.

    Two of the four clients hang up while they wait; every slot comes back
    once its lookup ends, so after the thaw all four take cache misses again.
    """
    proxy = TcpProxy.for_database(database_url)
    env = {
        "AUTHSVC_DATABASE_URL": proxy.url_for(database_url),
        "AUTHSVC_MAX_CONCURRENT_CALLS": "4",
        "AUTHSVC_STORE_TIMEOUT_MS": "5000",  # the stuck lookups hold their slots for as long as the store is frozen
    }

    async def fill_every_slot() -> list[asyncio.Task[tuple[int, float, bytes]]]:
        stuck = [asyncio.create_task(http_check(port, FORGED.generate().secret)) for _ in range(4)]
        await asyncio.sleep(0.5)  # all four are in the worker, waiting for PostgreSQL
        return stuck

    try:
        with serve_process(env, tmp_path) as server:
            port = http_port(server)
            key = create_key(server.target)
            assert (await http_check(port, key))[0] == 200
            proxy.freeze()
            try:
                stuck = await fill_every_slot()
                flood = await asyncio.gather(*(http_check(port, FORGED.generate().secret) for _ in range(60)))
                for gone in stuck[2:]:  # their clients give up: the connection closes while the lookup waits
                    gone.cancel()
                await asyncio.sleep(0.2)
            finally:
                proxy.thaw()
            stuck_results = await asyncio.gather(*stuck[:2])
            deadline = time.monotonic() + 10
            while (await http_check(port, key))[0] != 200:  # recovered: the store answers again
                assert time.monotonic() < deadline, "no recovery after the store thawed"
                await asyncio.sleep(0.1)
            unknown = await http_check(port, FORGED.generate().secret)
            proxy.freeze()  # every slot is free again: four misses are taken, the fifth is refused
            try:
                again = await fill_every_slot()
                fifth = await http_check(port, FORGED.generate().secret)
            finally:
                proxy.thaw()
            again_results = await asyncio.gather(*again)
    finally:
        proxy.close()
    assert {(status, body) for status, _, body in flood} == {(503, STORE_OUTAGE.body)}
    assert max(seconds for _, seconds, _ in flood) < 1.0, sorted(s for _, s, _ in flood)[-5:]
    # The stuck ones are answered once the store answers: nothing dropped, nothing crashed.
    assert {status for status, _, _ in stuck_results} <= {401, 503}
    assert unknown[0] == 401
    assert fifth[0] == 503
    assert {status for status, _, _ in again_results} == {401}, again_results
    assert "Traceback" not in server.log()


@pytest.mark.slow
async def test_a_cached_key_is_allowed_over_http_while_every_slot_waits_on_the_database(
    tmp_path: Path, database_url: str
) -> None:
    """A cache hit never waits, so it needs no slot: allowed at once while misses are refused (as over gRPC)."""
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_MAX_CONCURRENT_CALLS": "4",
        "AUTHSVC_STORE_TIMEOUT_MS": "3000",
    }
    with serve_process(env, tmp_path) as server:
        port = http_port(server)
        key = create_key(server.target)
        assert (await http_check(port, key))[0] == 200  # now cached
        async with lookups_blocked(database_url):
            stuck = [asyncio.create_task(http_check(port, FORGED.generate().secret)) for _ in range(4)]
            await asyncio.sleep(0.5)
            miss = await http_check(port, FORGED.generate().secret)
            hits = [await http_check(port, key) for _ in range(20)]
        await asyncio.gather(*stuck)
    assert (miss[0], miss[2]) == (503, STORE_OUTAGE.body)
    assert [status for status, _, _ in hits] == [200] * len(hits)  # were hits to need a slot, all would be 503
    assert max(seconds for _, seconds, _ in [miss, *hits]) < 1.0


@pytest.mark.slow
async def test_a_burst_past_the_cores_queue_is_partly_refused_with_cancelled_at_once_and_the_rest_answered(
    tmp_path: Path, database_url: str
) -> None:
    """1000 cache hits sent at the same instant: past ``AUTHSVC_MAX_QUEUED_CALLS`` (16) the core refuses.

    With gRPC's own bound every one would wait its turn: under overload that
    wait, which no Python code can shed, is what made answers seconds late.
    """
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_MAX_QUEUED_CALLS": "16"}
    with serve_process(env, tmp_path) as server:
        key = create_key(server.target)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: Stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            assert (await call(stub, key))[0] == "REASON_OK"  # now cached
            burst = await asyncio.gather(*(call(stub, key) for _ in range(1000)))
            after = [await call(stub, key) for _ in range(20)]
    outcomes = Counter(outcome for outcome, _, _ in burst)
    assert set(outcomes) == {"REASON_OK", "CANCELLED"}, outcomes
    assert outcomes["CANCELLED"] >= 500, outcomes  # past 16 queued, nearly all of a burst of 1000
    assert max(seconds for outcome, seconds, _ in burst if outcome == "CANCELLED") < 1.0
    assert [outcome for outcome, _, _ in after] == ["REASON_OK"] * 20  # one at a time: nothing queues
    assert "Traceback" not in server.log()


@pytest.mark.slow
async def test_misses_past_the_lookup_queue_are_refused_at_once_while_a_cached_key_works(
    tmp_path: Path, database_url: str
) -> None:
    """Beyond 16 waiting lookups, stored keys not in the cache get UNAVAILABLE at once; a cached key is allowed."""
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_MAX_WAITING_LOOKUPS": "16",
        "AUTHSVC_STORE_TIMEOUT_MS": "3000",
        "AUTHSVC_MAX_QUEUED_CALLS": "4096",  # the core's queue out of the way: this test is about lookups
    }
    with serve_process(env, tmp_path) as server:
        key = create_key(server.target)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: Stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            assert (await call(stub, key))[0] == "REASON_OK"  # now cached
            misses = await stored_keys(stub, 240)
            async with lookups_blocked(database_url):
                queued = [asyncio.create_task(call(stub, k)) for k in misses[:40]]
                await asyncio.sleep(0.5)
                flood = await asyncio.gather(*(call(stub, k) for k in misses[40:]))
                cached = await asyncio.gather(*(call(stub, key) for _ in range(50)))
            queued_results = await asyncio.gather(*queued)
    refused = [r for r in flood if r[0] == "UNAVAILABLE" and "lookups are waiting" in r[2]]
    assert len(refused) == 200, {r[0] + r[2] for r in flood}
    assert max(seconds for _, seconds, _ in flood) < 1.0
    assert {outcome for outcome, _, _ in cached} == {"REASON_OK"}
    assert max(seconds for _, seconds, _ in cached) < 1.0
    # Of the 40 queued first, at most 16 waiting plus one batch in flight were taken; the rest refused.
    taken = [r for r in queued_results if r[0] == "REASON_OK"]
    assert 1 <= len(taken) <= 32
    assert {r[0] for r in queued_results} <= {"REASON_OK", "UNAVAILABLE"}


@pytest.mark.slow
async def test_forged_keys_past_their_budget_are_refused_unlooked_up_while_stored_and_new_keys_are_allowed(
    tmp_path: Path, database_url: str
) -> None:
    """A flood of forged keys with valid checksums costs the store at most its budget (``authsvc.core.known``).

    They are not in the server's table of stored digests: past the budget
    (``SUSPECT_BURST`` at once, ``SUSPECT_RATE`` a second) they are refused
    at once, UNAVAILABLE, never looked up. Keys
    the server stores but has never looked up are allowed throughout, one by
    one while the flood runs, and so is a key created on another replica
    during the flood, once its notification has arrived.
    """
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_MAX_QUEUED_CALLS": "4096",
        "AUTHSVC_STORE_TIMEOUT_MS": "3000",  # lookups are slow on a machine this busy, and that is not the point here
    }
    with serve_process(env, tmp_path) as other:
        async with grpc.aio.insecure_channel(other.target) as other_channel:
            other_stub: Stub = authsvc_pb2_grpc.KeyServiceStub(other_channel)
            # Created before the flooded server starts: it knows them from its load's pages alone.
            uncached = await stored_keys(other_stub, 20)
            with serve_process(env, tmp_path) as server:
                await table_loaded(server)
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub: Stub = authsvc_pb2_grpc.KeyServiceStub(channel)
                    stop = asyncio.Event()
                    flood: list[tuple[str, float, str]] = []

                    async def forge() -> None:
                        while not stop.is_set():
                            flood.append(await call(stub, FORGED.generate().secret))

                    began = time.monotonic()
                    flooders = [asyncio.create_task(forge()) for _ in range(64)]
                    await asyncio.sleep(0.5)
                    during = [await call(stub, k) for k in uncached]
                    (created,) = await stored_keys(other_stub, 1)
                    await asyncio.sleep(0.5)  # the notification reaches this server's table, in milliseconds
                    new_key = await call(stub, created)
                    await asyncio.sleep(0.5)
                    stop.set()
                    await asyncio.gather(*flooders)
                    elapsed = time.monotonic() - began
    outcomes = Counter(outcome for outcome, _, _ in flood)
    assert set(outcomes) <= {"REASON_UNKNOWN_KEY", "UNAVAILABLE"}, outcomes
    refusals = Counter(detail for outcome, _, detail in flood if outcome == "UNAVAILABLE")
    assert set(refusals) <= {UNKNOWN_KEYS, STORE_UNAVAILABLE}, refusals
    # These, and only these, asked the store (a lookup that outlasts the budget is fail-closed UNAVAILABLE).
    looked_up = outcomes["REASON_UNKNOWN_KEY"] + refusals[STORE_UNAVAILABLE]
    budget = SUSPECT_BURST + SUSPECT_RATE * elapsed
    assert looked_up <= budget + 20, (looked_up, elapsed)
    assert refusals[UNKNOWN_KEYS] >= budget, refusals  # the budget held something back: the test tested it
    assert max(seconds for outcome, seconds, _ in flood if outcome == "UNAVAILABLE") < 1.0
    assert [outcome for outcome, _, _ in during] == ["REASON_OK"] * 20
    assert new_key[0] == "REASON_OK"
    assert "Traceback" not in server.log()


def test_connections_that_never_finish_the_http2_handshake_are_closed_within_the_bound(
    tmp_path: Path, database_url: str
) -> None:
    """Raw TCP that sends nothing, or only the HTTP/2 preface, is closed within the 1 s handshake bound."""
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_HANDSHAKE_TIMEOUT_MS": "1000"}
    with serve_process(env, tmp_path) as server:
        host, port = server.target.split(":")
        silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(5)]
        preface_only = [socket.create_connection((host, int(port)), timeout=5) for _ in range(5)]
        for sock in preface_only:
            sock.sendall(PREFACE)
        try:
            closed = [closed_within(sock, 4.0) for sock in silent + preface_only]
        finally:
            for sock in silent + preface_only:
                sock.close()
        wait_serving(server.target, timeout=5)  # and the server still serves
    assert all(c is not None for c in closed), closed
    assert max(c for c in closed if c is not None) < 3.0, closed


def test_more_connections_than_the_cap_are_refused_and_a_normal_client_works_afterwards(
    tmp_path: Path, database_url: str
) -> None:
    """With a cap of 20, the 40 extra raw connections are closed at once; once they go, clients connect again."""
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_MAX_CONNECTIONS": "20"}
    with serve_process(env, tmp_path) as server:
        host, port = server.target.split(":")
        held: list[socket.socket] = []
        try:
            for _ in range(60):
                sock = socket.create_connection((host, int(port)), timeout=5)
                sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface and an empty SETTINGS
                held.append(sock)
            time.sleep(0.5)
            closed = sum(1 for sock in held if closed_within(sock, 0.2) is not None)
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
        key = create_key(server.target)
        with grpc.insecure_channel(server.target) as channel:
            reply = authsvc_pb2_grpc.KeyServiceStub(channel).Authorize(
                pb.AuthorizeRequest(key=key, required_scope="read"), timeout=10
            )
    assert closed >= 40, closed
    assert reply.allowed


def open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def workers_of(pid: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker is a child too, not a worker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in found if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
def test_each_workers_open_file_limit_is_raised_to_the_hard_limit_and_the_connection_cap_stays_below(
    tmp_path: Path, database_url: str
) -> None:
    """Started with a soft limit of 256 under a hard one of 1024: every worker runs at 1024, its cap at 896."""
    base = free_port_range(2)  # the worker ports: base and base + 1, both free, not just base
    port, http = free_port(), free_port()
    while len({base, base + 1, port, http}) < 4:
        port, http = free_port(), free_port()
    env = {
        **os.environ,
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_LISTEN": f"127.0.0.1:{port}",
        "AUTHSVC_WORKERS": "2",
        "AUTHSVC_WORKER_BASE_PORT": str(base),
        "AUTHSVC_HTTP_AUTHZ_LISTEN": f"127.0.0.1:{http}",
        "AUTHSVC_METRICS_LISTEN": "",  # not what this test is about, and its fixed default port may be taken
        "AUTHSVC_DRAIN_SECONDS": "0",
    }
    hard = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authsvc", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        )
    try:
        for target in (port, base, base + 1):  # both workers have started
            try:
                wait_serving(f"127.0.0.1:{target}", proc=proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}: {log.read_text()[-2000:]}") from None
        deadline = time.monotonic() + 10
        while len(workers := workers_of(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        limits = [open_file_limits(pid) for pid in workers]
    finally:
        proc.terminate()
        proc.wait(15)
    assert len(limits) == 2
    assert all(soft == hard_ == hard for soft, hard_ in limits), limits
    assert f"AUTHSVC_MAX_CONNECTIONS=4000 lowered to {hard - 128}" in log.read_text()


class HangableRedis:
    """A TCP hop to the real Redis that a test can hang: it then accepts and reads, and never answers.

    ``received_while_hung`` counts the bytes that reached it while hung: what
    a circuit breaker should keep at zero once it is open.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hung = False
        self.received_while_hung = 0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.hung:
                    if from_client:
                        self.received_while_hung += len(data)
                    continue  # swallowed: the client waits for an answer that never comes
                sink.sendall(data)

    def close(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


LIMIT = 100_000


@pytest.fixture
def hangable_redis(redis_url: str) -> Iterator[HangableRedis]:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    proxy = HangableRedis((parts.hostname or "127.0.0.1", parts.port or 6379))
    yield proxy
    proxy.close()


@pytest.mark.slow
async def test_a_hung_redis_costs_the_timeout_once_then_the_breaker_counts_locally_until_redis_answers(
    tmp_path: Path, database_url: str, redis_url: str, hangable_redis: HangableRedis
) -> None:
    """Hung: one call waits out the 50 ms timeout, then 2 s of calls are fast and send Redis nothing; back: shared."""
    db = redis_url.rsplit("/", 1)[-1]
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_REDIS_URL": f"redis://127.0.0.1:{hangable_redis.port}/{db}",
        "AUTHSVC_RATE_LIMIT": str(LIMIT),
        "AUTHSVC_RATE_LIMIT_WINDOW_SECONDS": "86400",  # one window for the whole test
        "AUTHSVC_REDIS_BREAKER_MS": "3000",
    }
    with serve_process(env, tmp_path) as server:
        key = create_key(server.target)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub: Stub = authsvc_pb2_grpc.KeyServiceStub(channel)

            async def remaining() -> tuple[float, int]:
                start = time.monotonic()
                reply = await stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=5)
                assert reply.allowed
                return time.monotonic() - start, reply.rate_limit.remaining

            for _ in range(5):
                await remaining()  # warm: cached key, Redis connection open
            _, shared_before = await remaining()
            hangable_redis.hung = True
            first, _ = await remaining()
            sent_by_first = hangable_redis.received_while_hung
            open_calls = [await remaining() for _ in range(100)]
            await asyncio.sleep(max(0.0, 2.0 - sum(t for t, _ in open_calls)))
            open_calls += [await remaining() for _ in range(20)]
            sent_while_open = hangable_redis.received_while_hung - sent_by_first
            hangable_redis.hung = False
            await asyncio.sleep(1.5)  # the open period (3 s from the failure) ends
            back = [await remaining() for _ in range(5)]
    assert first >= 0.045, first  # the one call that found out
    assert sent_by_first > 0
    assert sent_while_open == 0, f"{sent_while_open} bytes reached the hung Redis while the breaker was open"
    latencies = sorted(t for t, _ in open_calls)
    assert latencies[int(len(latencies) * 0.99) - 1] < 0.04, latencies[-5:]
    # Counted locally while open (the failed call was the local count's first); shared again once Redis answers.
    assert [r for _, r in open_calls] == [LIMIT - 2 - i for i in range(len(open_calls))]
    assert [r for _, r in back] == [shared_before - 1 - i for i in range(5)]
