"""Issue 14: GetKeyUsage counts every Authorize answer exactly, across `authsvc serve --workers 2`.

Each worker batches its own counts; the sums in PostgreSQL must equal the
answers the clients saw, after the flush bound, and after a graceful stop
even when the interval has not elapsed.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, MEMBER, free_port, new_org, serve_process, wait_serving

pytestmark = pytest.mark.slow


def _ports() -> tuple[int, int]:
    def busy(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    base = free_port()
    while any(busy(base + i) for i in range(2)):
        base = free_port()
    shared = free_port()
    while shared in (base, base + 1):
        shared = free_port()
    return base, shared


def _drive(stubs: list[authsvc_pb2_grpc.KeyServiceStub], secret: str) -> dict[str, int]:
    """Different numbers of calls to each worker; what the clients saw, by outcome."""
    seen = {"allowed": 0, "denied": 0, "rate_limited": 0}
    for n, stub in enumerate(stubs):
        for i in range(20 + 7 * n):
            answer = stub.Authorize(pb.AuthorizeRequest(key=secret, required_scope="write" if i % 3 == 0 else "read"))
            if answer.allowed:
                seen["allowed"] += 1
            elif answer.reason == pb.REASON_INSUFFICIENT_SCOPE:
                seen["denied"] += 1
            else:
                assert answer.reason == pb.REASON_RATE_LIMITED
                seen["rate_limited"] += 1
    return seen


def _today(stub: authsvc_pb2_grpc.KeyServiceStub, org: str, key_id: str) -> pb.KeyUsageDay:
    usage = stub.GetKeyUsage(pb.GetKeyUsageRequest(org_id=org, key_id=key_id, actor=MEMBER, days=3), timeout=10)
    assert [d.date for d in usage.days][-1] == datetime.now(UTC).date().isoformat()
    assert len(usage.days) == 3 and all(d.allowed == d.denied == d.rate_limited == 0 for d in usage.days[:-1])
    return usage.days[-1]


@pytest.mark.parametrize("flush_seconds", ["0.2", "10"])
def test_usage_counts_equal_the_answers_across_two_workers(
    tmp_path: Path, database_url: str, flush_seconds: str
) -> None:
    """0.2 s: read while serving, after the flush bound. 10 s: read after a graceful stop, before any flush."""
    base, shared = _ports()
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_WORKER_BASE_PORT": str(base),
        "AUTHSVC_LAST_USED_FLUSH_SECONDS": flush_seconds,
    }
    org = new_org()
    with serve_process(env, tmp_path, args=("--workers", "2"), port=shared) as server:
        for port in (base, base + 1):
            wait_serving(f"127.0.0.1:{port}", proc=server.proc)
        with (
            grpc.insecure_channel(f"127.0.0.1:{base}") as first,
            grpc.insecure_channel(f"127.0.0.1:{base + 1}") as second,
        ):
            stubs = [authsvc_pb2_grpc.KeyServiceStub(first), authsvc_pb2_grpc.KeyServiceStub(second)]
            # A per-key limit of 5 per window, counted per worker (no Redis): some answers are 429s.
            created = stubs[0].CreateKey(
                pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"], rate_limit=5)
            )
            seen = _drive(stubs, created.secret)
            assert seen["allowed"] and seen["denied"] and seen["rate_limited"]
            if flush_seconds == "0.2":
                deadline = time.monotonic() + 5
                while True:
                    day = _today(stubs[1], org, created.key.id)
                    if (day.allowed, day.denied, day.rate_limited) == tuple(seen.values()):
                        break
                    assert time.monotonic() < deadline, f"counts {day} never reached {seen}"
                    time.sleep(0.1)
        assert server.terminate() == 0
    if flush_seconds == "10":
        with serve_process({"AUTHSVC_DATABASE_URL": database_url}, tmp_path) as server:
            with grpc.insecure_channel(server.target) as channel:
                day = _today(authsvc_pb2_grpc.KeyServiceStub(channel), org, created.key.id)
            assert (day.allowed, day.denied, day.rate_limited) == tuple(seen.values())
