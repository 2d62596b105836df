"""A real Prometheus scrapes a real ``authsvc serve --workers 2``; we ask Prometheus what it saw.

Prometheus (Debian's ``prometheus`` package) runs with its own temporary data
directory and port on 127.0.0.1, a generated config that scrapes every
second, and the shipped alert rules; over mTLS too (``scheme: https``,
``tls_config``), with certificates made for this run (``tests.tls``). Under CI=true a missing ``prometheus``
binary fails the test; elsewhere it is skipped, saying what to install.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from authsvc.core.keyformat import KeyFormat
from tests.support import ADMIN, ROOT, free_port, free_port_range, new_org, serve_process, wait_serving
from tests.tls import CertificateAuthority

pytestmark = pytest.mark.slow
DEPLOY = ROOT / "deploy"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "no prometheus binary: install Debian's prometheus package (scripts/install does, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  # fixed http://127.0.0.1 URLs
        body: bytes = reply.read()
    return body.decode()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = json.loads(http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def until(self, what: Callable[[], object], expected: object, within: float = 30.0) -> None:
        """Poll until ``what()`` equals ``expected``; a scrape every second, plus the workers' 0.5 s flush."""
        deadline = time.monotonic() + within
        seen: object = None
        while time.monotonic() < deadline:
            seen = what()
            if seen == expected:
                return
            time.sleep(0.25)
        raise AssertionError(f"Prometheus still reports {seen!r}, expected {expected!r}")


class StartPrometheus(Protocol):
    def __call__(self, target: str, scrape_configs: list[dict[str, object]] | None = None) -> Prometheus: ...


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[StartPrometheus]:
    binary = prometheus_binary()
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, scrape_configs: list[dict[str, object]] | None = None) -> Prometheus:
        """Prometheus scraping ``target`` as job ``authsvc`` (plaintext), or with ``scrape_configs`` as given."""
        if scrape_configs is None:
            scrape_configs = [{"job_name": "authsvc", "static_configs": [{"targets": [target]}]}]
        rules = tmp_path / "alerts.yaml"
        shutil.copy(DEPLOY / "prometheus" / "alerts.yaml", rules)
        config = tmp_path / "prometheus.yaml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": scrape_configs,
                }
            )
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(f"{url}/-/ready")
                break
            except OSError:
                assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus not ready after 30 s"
                time.sleep(0.2)
        return Prometheus(url)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_sees_the_totals_of_both_workers(
    tmp_path: Path, database_url: str, prometheus_for: StartPrometheus
) -> None:
    metrics_port = free_port()
    base = free_port_range(2)
    while metrics_port in (base, base + 1):
        base = free_port_range(2)
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "AUTHSVC_WORKER_BASE_PORT": str(base),
        "AUTHSVC_STORE_TIMEOUT_MS": "2000",  # exact counts: no UNAVAILABLE because a busy machine was slow
    }
    with serve_process(env, tmp_path, args=("--workers", "2")) as server:
        workers = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        for target in workers:
            wait_serving(target, proc=server.proc)
        prometheus = prometheus_for(f"127.0.0.1:{metrics_port}")
        prometheus.until(lambda: prometheus.scalar('up{job="authsvc"}'), 1.0)

        sent: collections.Counter[str] = collections.Counter()
        org = new_org()
        with grpc.insecure_channel(workers[0]) as first, grpc.insecure_channel(workers[1]) as second:
            stubs = [authsvc_pb2_grpc.KeyServiceStub(first), authsvc_pb2_grpc.KeyServiceStub(second)]

            def authorize(worker: int, key: str, scope: str = "read") -> int:
                reply = stubs[worker].Authorize(pb.AuthorizeRequest(key=key, required_scope=scope), timeout=10)
                sent[pb.Reason.Name(reply.reason).removeprefix("REASON_").lower()] += 1
                return reply.reason

            keys = [
                stubs[0].CreateKey(
                    pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=f"k{i}", scopes=["read"]), timeout=10
                )
                for i in range(3)
            ]
            unknown = KeyFormat("authsvc").generate().secret
            for worker in (0, 1):
                for key in keys:
                    for _ in range(3):
                        authorize(worker, key.secret)
                authorize(worker, keys[0].secret, "write")
                authorize(worker, "")
                authorize(worker, "authsvc_garbage")
                authorize(worker, unknown)
            # Every create's notification reached both processes.
            lag_count = "sum(authsvc_invalidation_lag_seconds_count)"
            prometheus.until(lambda: prometheus.scalar(lag_count), 3.0 * 2)
            for key in keys[:2]:
                stubs[0].RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=key.key.id, actor=ADMIN), timeout=10)
            for worker in (0, 1):
                for key in keys[:2]:
                    deadline = time.monotonic() + 5
                    while authorize(worker, key.secret) != pb.REASON_REVOKED:
                        assert time.monotonic() < deadline, "a revoked key is still allowed after 5 s"
            # One observation per change (3 creates, 2 revocations) per process, no more, no less.
            prometheus.until(lambda: prometheus.scalar(lag_count), (3.0 + 2.0) * 2)

        assert sent["ok"] >= 18 and sent["revoked"] >= 4  # the outcomes we know we caused
        expected = {reason: float(n) for reason, n in sent.items()}
        prometheus.until(lambda: prometheus.by_label("sum by (reason) (authsvc_authorize_total)", "reason"), expected)
        assert prometheus.by_label("sum by (transport) (authsvc_authorize_total)", "transport") == {
            "grpc": float(sum(sent.values()))
        }
        management = prometheus.by_label('authsvc_management_requests_total{code="OK"}', "method")
        assert management == {"CreateKey": 3.0, "RevokeKey": 2.0}
        assert prometheus.scalar("authsvc_invalidation_feed_up") == 1.0
        p99 = prometheus.scalar("histogram_quantile(0.99, sum by (le) (authsvc_invalidation_lag_seconds_bucket))")
        assert p99 is not None and 0 <= p99 < 5

        # The shipped rules load into a real Prometheus, and nothing fires on a healthy service.
        rules = json.loads(http_get(f"{prometheus.url}/api/v1/rules"))["data"]["groups"][0]["rules"]
        assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules  # every rule of alerts.yaml
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
        # Every query of the shipped dashboard is valid PromQL that Prometheus evaluates.
        dashboard = json.loads((DEPLOY / "grafana" / "authsvc.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        assert len(exprs) >= 10
        for expr in exprs:
            prometheus.query(expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))

        # What Prometheus stores is what authsvc exposes: no key, prefix, key id or org id.
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        for key in keys:
            for secret in (key.secret, key.secret[12:], key.key.prefix, key.key.id):
                assert secret not in text
        assert org not in text and unknown not in text
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", text)  # no UUID of any kind
        assert server.terminate() == 0


def test_prometheus_scrapes_over_mtls_and_scrapes_without_tls_or_a_client_certificate_fail(
    tmp_path: Path, database_url: str, prometheus_for: StartPrometheus
) -> None:
    """``scheme: https`` with the CA and a client certificate from the client CA: up; plaintext or no certificate: down.

    With ``--workers 2`` the supervisor serves ``/metrics``, so this is the
    supervisor's listener; ``server/test_tls.py`` covers a single process's.
    """
    ca = CertificateAuthority(tmp_path)
    server_cert = ca.server()
    scraper = ca.issue("prometheus", common_name="prometheus", client=True)
    metrics_port = free_port()
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "AUTHSVC_TLS_CERT_FILE": str(server_cert.cert_file),
        "AUTHSVC_TLS_KEY_FILE": str(server_cert.key_file),
        "AUTHSVC_TLS_CLIENT_CA_FILE": str(ca.cert_file),
    }
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, scraper.key_pem, scraper.cert_pem)
    target = f"127.0.0.1:{metrics_port}"

    def job(name: str, scheme: str, tls_config: dict[str, str] | None = None) -> dict[str, object]:
        config: dict[str, object] = {"job_name": name, "scheme": scheme, "static_configs": [{"targets": [target]}]}
        if tls_config is not None:
            config["tls_config"] = tls_config
        return config

    with serve_process(env, tmp_path, args=("--workers", "2"), credentials=credentials) as server:
        prometheus = prometheus_for(
            target,
            [
                job(
                    "authsvc",
                    "https",
                    {
                        "ca_file": str(ca.cert_file),
                        "cert_file": str(scraper.cert_file),
                        "key_file": str(scraper.key_file),
                    },
                ),
                job("plaintext", "http"),
                job("no-client-certificate", "https", {"ca_file": str(ca.cert_file)}),
            ],
        )
        expected = {"authsvc": 1.0, "plaintext": 0.0, "no-client-certificate": 0.0}
        prometheus.until(lambda: prometheus.by_label("up", "job"), expected)
        assert prometheus.by_label("authsvc_build_info", "job") == {"authsvc": 1.0}
        rules = json.loads(http_get(f"{prometheus.url}/api/v1/rules"))["data"]["groups"][0]["rules"]
        assert all(r["health"] == "ok" for r in rules), rules
        assert server.terminate() == 0
