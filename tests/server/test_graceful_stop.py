"""SIGTERM: health turns NOT_SERVING first, calls are still served for the drain period, then the server stops.

The point is a replica's stop that no caller notices: health-checking
clients (gRPC's ``healthCheckConfig``, Envoy's health checks) move to the
other replicas once they see NOT_SERVING, and they only see it while the
stopping replica is still up.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ADMIN, free_port, free_port_range, new_org, serve_process, wait_serving

# Without Redis each process counts alone (README, Rate limits), so the
# "remaining" of a huge limit tells the two replicas' sequences apart.
COUNTING = {"AUTHSVC_RATE_LIMIT": "1000000000", "AUTHSVC_RATE_LIMIT_WINDOW_SECONDS": "86400", "AUTHSVC_REDIS_URL": ""}
# These tests are about the stop, not about failing closed: a database lookup
# slowed by a loaded machine must not turn into an UNAVAILABLE here.
PATIENT = {"AUTHSVC_STORE_TIMEOUT_MS": "5000"}
HEALTH_CHECKED_ROUND_ROBIN = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def create_key(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = authsvc_pb2_grpc.KeyServiceStub(channel)
        reply = stub.CreateKey(pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"]))
        return str(reply.secret)


class Stream:
    """A steady stream of Authorize calls from a few threads over one channel; every outcome kept."""

    def __init__(self, channel: grpc.Channel, key: str, threads: int = 4) -> None:
        self._authorize = authsvc_pb2_grpc.KeyServiceStub(channel).Authorize
        self._request = pb.AuthorizeRequest(key=key, required_scope="read")
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self.failures: Counter[str] = Counter()
        self.remaining: list[int] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while self._running.is_set():
            try:
                reply = self._authorize(self._request, timeout=2)
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures[exc.code().name] += 1
                continue
            with self._lock:
                if not reply.allowed:
                    self.failures[pb.Reason.Name(reply.reason)] += 1
                self.remaining.append(reply.rate_limit.remaining)
            time.sleep(0.002)

    def calls(self) -> int:
        with self._lock:
            return len(self.remaining) + sum(self.failures.values())

    def stop(self) -> None:
        self._running.clear()
        for thread in self._threads:
            thread.join(5)


@pytest.mark.slow
def test_stopping_one_of_two_replicas_fails_no_call(tmp_path: Path, database_url: str) -> None:
    env = {"AUTHSVC_DATABASE_URL": database_url, "AUTHSVC_DRAIN_SECONDS": "3", **PATIENT, **COUNTING}
    with serve_process(env, tmp_path) as first, serve_process(env, tmp_path) as second:
        key = create_key(second.target)
        options = [("grpc.service_config", HEALTH_CHECKED_ROUND_ROBIN), ("grpc.enable_retries", 0)]
        with grpc.insecure_channel(f"ipv4:{first.target},{second.target}", options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stream = Stream(channel, key)
            try:
                time.sleep(1.0)
                before = list(stream.remaining)
                # Both replicas answered: each one's counter repeats the other's values.
                assert len(before) > len(set(before)) > 10, "round_robin did not reach both replicas"
                stopped_at = time.monotonic()
                first.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                assert health(first.target) == "NOT_SERVING"  # at once, while it still serves
                assert first.proc.wait(timeout=15) == 0
                stop_took = time.monotonic() - stopped_at
                calls_at_exit = stream.calls()
                time.sleep(1.0)  # and after it is gone, the other replica takes everything
                assert stream.calls() > calls_at_exit + 20
            finally:
                stream.stop()
        assert stream.failures == Counter(), f"calls failed across the stop: {dict(stream.failures)}"
        assert health(second.target) == "SERVING"
    assert 3.0 <= stop_took < 3.0 + 5.0 + 3.0  # the drain, then at most the in-flight grace (and process exit)
    assert "still serving for 3s (AUTHSVC_DRAIN_SECONDS)" in first.log()


@pytest.mark.slow
def test_every_worker_drains_on_sigterm(tmp_path: Path, database_url: str) -> None:
    """With --workers N the supervisor passes SIGTERM on; each worker reports NOT_SERVING and keeps answering."""
    base, shared = free_port_range(2), free_port()
    while shared in (base, base + 1):
        shared = free_port()
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_DRAIN_SECONDS": "4",
        "AUTHSVC_WORKER_BASE_PORT": str(base),
        **PATIENT,
    }
    with serve_process(env, tmp_path, args=("--workers", "2"), port=shared) as server:
        workers = [f"127.0.0.1:{base + i}" for i in range(2)]
        for target in workers:
            wait_serving(target, proc=server.proc)
        key = create_key(workers[0])
        channels = [grpc.insecure_channel(target) for target in workers]
        try:
            stubs = [authsvc_pb2_grpc.KeyServiceStub(channel) for channel in channels]
            request = pb.AuthorizeRequest(key=key, required_scope="read")
            stopped_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            deadline = stopped_at + 3.0
            while any(health(target) != "NOT_SERVING" for target in workers):
                assert time.monotonic() < deadline, "a worker did not turn NOT_SERVING"
                time.sleep(0.05)
            for stub in stubs:  # NOT_SERVING, yet still answering during the drain
                assert stub.Authorize(request, timeout=2).allowed
            assert time.monotonic() - stopped_at < 4.0  # all of that within the drain
            assert server.proc.wait(timeout=20) == 0
            assert time.monotonic() - stopped_at >= 4.0
        finally:
            for channel in channels:
                channel.close()
    assert server.log().count("still serving for 4s") == 2
