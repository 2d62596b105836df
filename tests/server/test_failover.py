"""Issue 9, items 1 and 2: a revoked key is never allowed, whatever the database topology does.

Real ``authsvc serve`` processes on a real PostgreSQL primary and streaming
standby of the test's own (tests/cluster.py), reached through a multi-host
URL as an operator would configure it. Each replica names its connections
(``application_name``) so the test can find, and freeze, its backends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cluster import Postgres, multi_host_url, primary_and_standby, primary_only
from tests.support import ADMIN, ServerProcess, new_org, serve_process, wait_serving

pytestmark = pytest.mark.slow

ALLOW = "ALLOW"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    """One authsvc process as a client sees it: a channel, its stubs, its log."""

    def __init__(self, server: ServerProcess, name: str) -> None:
        self.server = server
        self.name = name
        self.channel = grpc.insecure_channel(server.target)
        self.keys = authsvc_pb2_grpc.KeyServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def outcome(self, secret: str, timeout: float = 2.0) -> str:
        """``ALLOW``, the denial reason, or the gRPC status code of the failed call."""
        try:
            reply = self.keys.Authorize(pb.AuthorizeRequest(key=secret, required_scope="read"), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return ALLOW if reply.allowed else pb.Reason.Name(reply.reason)

    def status(self) -> int:
        try:
            return int(self.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
        except grpc.RpcError:
            return -1

    def create(self, org: str) -> pb.CreateKeyResponse:
        reply: pb.CreateKeyResponse = self.keys.CreateKey(
            pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="failover", scopes=["read"]), timeout=10
        )
        return reply

    def revoke(self, org: str, key_id: str) -> None:
        self.keys.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key_id, actor=ADMIN, reason="test"), timeout=10)

    def write_code(self, org: str) -> str:
        """What CreateKey answers right now: OK or the status code."""
        try:
            self.create(org)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"


@contextlib.contextmanager
def replicas(
    tmp: Path, *servers: Postgres, names: tuple[str, ...] = ("authsvc-a", "authsvc-b"), store_timeout_ms: int = 100
) -> Iterator[list[Replica]]:
    """``authsvc serve`` once per name, all on the multi-host URL of ``servers``, started together.

    ``store_timeout_ms``: the tests that are not about timing give lookups more time, so that a
    busy machine does not turn a cold lookup into UNAVAILABLE where the test expects an answer.
    """
    with contextlib.ExitStack() as stack:
        started = [
            (
                stack.enter_context(
                    serve_process(
                        {
                            "AUTHSVC_DATABASE_URL": multi_host_url(*servers, application_name=name),
                            "AUTHSVC_STORE_TIMEOUT_MS": str(store_timeout_ms),
                        },
                        tmp,
                        wait=False,
                    )
                ),
                name,
            )
            for name in names
        ]
        for server, _ in started:
            wait_serving(server.target, timeout=30, proc=server.proc)
        out = [Replica(server, name) for server, name in started]
        try:
            yield out
        finally:
            for replica in out:
                replica.channel.close()


def until(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not reached within {within} s: {what}"
        time.sleep(0.02)


def test_a_key_revoked_while_the_standby_lags_is_denied_everywhere_after_the_primary_restarts(tmp_path: Path) -> None:
    """Item 1 as reported: primary down 3 s and back, replay paused on the standby, revoke: 0 allows after 100 ms.

    Before the fix the pools stayed on the standby, read the stale row after
    the revocation's eviction and cached it; writes answered INTERNAL and
    health stayed SERVING. Now every connection goes to the writable
    primary or nowhere.
    """
    with (
        primary_and_standby() as (primary, standby),
        replicas(tmp_path, primary, standby, store_timeout_ms=1000) as (
            a,
            b,
        ),
    ):
        org = new_org()
        key = a.create(org)
        until(lambda: a.outcome(key.secret) == ALLOW == b.outcome(key.secret), 5, "the key allowed on both")

        primary.stop()
        outage_end = time.monotonic() + 3.0
        # No writable primary (only the standby answers): fail closed, say so, no INTERNAL.
        until(lambda: a.status() == NOT_SERVING and b.status() == NOT_SERVING, 5, "NOT_SERVING without a primary")
        seen = [r.outcome(key.secret) for r in (a, b) for _ in range(5)]
        assert set(seen) == {"UNAVAILABLE"}, seen
        writes = [a.write_code(org), b.write_code(org)]
        assert set(writes) == {"UNAVAILABLE"}, writes
        time.sleep(max(0.0, outage_end - time.monotonic()))

        primary.start()
        until(lambda: a.status() == SERVING and b.status() == SERVING, 15, "SERVING again with the primary back")
        # The cause of the report, checked directly: no authsvc connection stays on the standby
        # (a connection attempt that the driver rejected may take a moment to disappear).
        until(lambda: standby.backends("authsvc-a") == [] == standby.backends("authsvc-b"), 3, "nothing on the standby")

        standby.pause_replay()
        until(lambda: a.outcome(key.secret) == ALLOW and b.outcome(key.secret) == ALLOW, 5, "the key cached again")
        sent = time.monotonic()
        a.revoke(org, key.key.id)
        # b hears of it by notification, within milliseconds and at most the 100 ms freshness
        # bound; before the fix it allowed the key for good (988 of 988 calls, 33 s on).
        answers: list[tuple[float, str]] = []
        while (started := time.monotonic()) - sent < 1.5:
            answers += [(started - sent, b.outcome(key.secret)), (started - sent, a.outcome(key.secret))]
        late = [t for t, o in answers if o == ALLOW and t > 0.1]
        assert late == [], f"{len(late)} allows of the revoked key later than 100 ms after the revoke"
        assert {o for t, o in answers if t > 0.1} == {"REASON_REVOKED"}
        print(f"allows within the first 100 ms (notification in flight): {[o for _, o in answers].count(ALLOW)}")
        # Writes work while the standby lags: they reach the primary.
        fresh = b.create(org)
        assert a.outcome(fresh.secret) == ALLOW
        standby.resume_replay()


def test_after_promotion_caches_reset_and_revocations_reach_every_replica(tmp_path: Path) -> None:
    """Primary stopped, standby promoted: what the caches held is dropped, old revocations hold, new ones spread."""
    with (
        primary_and_standby() as (primary, standby),
        replicas(tmp_path, primary, standby, store_timeout_ms=1000) as (
            a,
            b,
        ),
    ):
        org = new_org()
        revoked_before, revoked_after, changed_unannounced = (a.create(org) for _ in range(3))
        for key in (revoked_before, revoked_after, changed_unannounced):
            until(lambda k=key: a.outcome(k.secret) == ALLOW == b.outcome(k.secret), 5, "the keys allowed on both")
        a.revoke(org, revoked_before.key.id)
        until(lambda: b.outcome(revoked_before.secret) == "REASON_REVOKED", 2, "revocation reached b")
        # Changed behind the caches' back (no NOTIFY): both keep serving their cached allow,
        # until the failover makes them start over.
        primary.psql(
            "UPDATE api_keys SET revoke_time = now(), revoked_by = 'dba', revoke_reason = 'by hand' "
            f"WHERE id = '{changed_unannounced.key.id}'",
            "authsvc",
        )
        # Normally both still allow it from their caches. (On a starved machine a cache may miss its
        # 100 ms freshness bound and read the row, so this is reported, not required.)
        held = [a.outcome(changed_unannounced.secret), b.outcome(changed_unannounced.secret)]
        print(f"before the failover the caches answered {held} for the key revoked behind their back")
        standby.wait_replayed(primary)

        primary.stop()
        standby.promote()
        during: list[str] = []
        while not (a.status() == SERVING and b.status() == SERVING):
            during += [r.outcome(revoked_before.secret, timeout=1) for r in (a, b)]
            assert len(during) < 2000, "replicas did not serve from the promoted standby"
        assert ALLOW not in during
        for r in (a, b):
            assert r.outcome(revoked_before.secret) == "REASON_REVOKED"
            assert r.outcome(changed_unannounced.secret) == "REASON_REVOKED"  # the cache was reset
            assert r.outcome(revoked_after.secret) == ALLOW

        sent = time.monotonic()
        b.revoke(org, revoked_after.key.id)
        answers: list[tuple[float, str]] = []  # (call started, seconds after the revoke was sent; outcome)
        while (started := time.monotonic()) - sent < 1.0:
            answers += [(started - sent, r.outcome(revoked_after.secret)) for r in (a, b)]
        assert [t for t, o in answers if o == ALLOW and t > 0.1] == [], "allowed later than 100 ms after the revoke"
        assert {o for t, o in answers if t > 0.1} == {"REASON_REVOKED"}
        assert a.write_code(org) == "OK"


def test_a_replica_with_frozen_database_connections_serves_no_allow_100_ms_after_a_revocation(tmp_path: Path) -> None:
    """Item 2: SIGSTOP a replica's backends (listener and pool), revoke elsewhere, then ask it.

    Its cache may answer from memory only while its feed is proven fresh,
    i.e. until 100 ms after the last heartbeat *sent* before the freeze.
    Every call started later than 100 ms after the revocation was sent must
    be denied or UNAVAILABLE. 12 trials.
    """
    trials = 12
    latest_allow = 0.0
    late_allows: list[float] = []
    with primary_only() as primary, replicas(tmp_path, primary) as (a, b):
        for trial in range(trials):
            org = new_org()
            key = b.create(org)
            until(lambda: a.outcome(key.secret) == ALLOW, 10, "the key allowed and cached on a")  # noqa: B023
            frozen = primary.freeze_backends("authsvc-a")
            assert len(frozen) >= 2, f"expected a's listener and pool backends, found {frozen}"
            try:
                sent = time.monotonic()
                b.revoke(org, key.key.id)
                samples: list[tuple[float, str]] = []
                while (started := time.monotonic()) - sent < 0.4:
                    samples.append((started - sent, a.outcome(key.secret, timeout=1)))
            finally:
                primary.thaw()
            allows = [t for t, o in samples if o == ALLOW]
            latest_allow = max([latest_allow, *allows])
            late_allows += [t for t in allows if t > 0.1]
            after = {o for t, o in samples if t > 0.1}
            assert after, f"trial {trial}: no call answered later than 100 ms after the revoke"
            assert after <= {"REASON_REVOKED", "UNAVAILABLE", ALLOW}, f"trial {trial}: {after}"
            until(lambda: a.outcome(key.secret) == "REASON_REVOKED", 10, "a recovers after the thaw")  # noqa: B023
    print(f"frozen-replica trials: {trials}, latest allow {latest_allow * 1000:.0f} ms after the revoke was sent")
    assert late_allows == [], (
        f"{len(late_allows)} allows later than 100 ms after the revoke, up to {max(late_allows)} s"
    )


def test_a_primary_turned_read_only_fails_closed_with_unavailable_never_internal(tmp_path: Path) -> None:
    """A server that stops taking writes is no primary: NOT_SERVING, UNAVAILABLE everywhere, then back."""
    with primary_only() as primary, replicas(tmp_path, primary, names=("authsvc-a",), store_timeout_ms=1000) as (a,):
        org = new_org()
        key = a.create(org)
        assert a.outcome(key.secret) == ALLOW
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()")
        until(lambda: a.status() == NOT_SERVING, 5, "NOT_SERVING on a read-only server")
        assert a.write_code(org) == "UNAVAILABLE"
        with pytest.raises(grpc.RpcError) as revoke:
            a.revoke(org, key.key.id)
        assert revoke.value.code() == grpc.StatusCode.UNAVAILABLE
        until(lambda: a.outcome(key.secret) == "UNAVAILABLE", 2, "cached answers stop too")
        assert "Traceback" not in a.server.log()

        primary.psql(
            "SET default_transaction_read_only = off; ALTER SYSTEM RESET default_transaction_read_only; "
            "SELECT pg_reload_conf()"
        )
        until(lambda: a.status() == SERVING, 10, "SERVING once the server takes writes again")
        assert a.write_code(org) == "OK"
        assert a.outcome(key.secret) == ALLOW


def test_starting_without_a_writable_primary_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Only a read-only server answers: authsvc does not start on it, and says what to check."""
    from tests.server.test_process import run_serve

    with primary_only() as primary:
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()")
        result = run_serve({"AUTHSVC_DATABASE_URL": multi_host_url(primary), "AUTHSVC_WORKERS": "1"}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "writable" in lines[0] and "AUTHSVC_DATABASE_URL" in lines[0]
    assert "Traceback" not in result.stderr
