"""What one scrape of ``--workers N`` reports: every worker's snapshot added up, feed_up the minimum."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authsvc.core.keys import Reason
from authsvc.metrics import Collector, Metrics


def _scrape(*workers: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: [m.snapshot() for m in workers]))
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def _worker(feed_up: int, ok: int, lag: float) -> Metrics:
    m = Metrics()
    for _ in range(ok):
        m.decided(Reason.OK, "grpc", True, 0.00003)
    m.decided(Reason.UNKNOWN_KEY, "envoy_grpc", False, 0.002)
    m.failed("unavailable", "grpc", 0.1)
    m.invalidated(lag)
    m.store_error("lookup")
    m.managed("CreateKey", "OK")
    m.gauges = lambda: {"feed_up": feed_up, "cache_entries": 10, "pool_idle": 1, "pool_in_use": 1}
    return m


def test_workers_add_up_and_one_down_feed_shows_as_down() -> None:
    s = _scrape(_worker(1, ok=3, lag=0.002), _worker(0, ok=2, lag=-0.001))

    def v(name: str, **labels: str) -> float:
        return s[(name, frozenset(labels.items()))]

    assert v("authsvc_authorize_total", reason="ok", transport="grpc") == 5
    assert v("authsvc_authorize_total", reason="unknown_key", transport="envoy_grpc") == 2
    assert v("authsvc_authorize_total", reason="unavailable", transport="grpc") == 2
    assert v("authsvc_cache_hits_total") == 5 and v("authsvc_cache_misses_total") == 2
    assert v("authsvc_authorize_duration_seconds_bucket", transport="grpc", cache="hit", le="5e-05") == 5
    assert v("authsvc_authorize_duration_seconds_bucket", transport="grpc", cache="hit", le="+Inf") == 7
    assert v("authsvc_authorize_duration_seconds_count", transport="envoy_grpc", cache="miss") == 2
    assert v("authsvc_invalidation_lag_seconds_count") == 2
    assert v("authsvc_invalidation_lag_seconds_bucket", le="0.0005") == 1  # a negative lag (clock skew) counts as 0
    assert v("authsvc_invalidation_feed_up") == 0
    assert v("authsvc_cache_entries") == 20
    assert v("authsvc_db_pool_connections", state="in_use") == 2
    assert v("authsvc_store_errors_total", operation="lookup") == 2
    assert v("authsvc_management_requests_total", method="CreateKey", code="OK") == 2


def test_no_worker_has_written_yet_means_zeros_and_a_down_feed() -> None:
    s = _scrape()
    assert s[("authsvc_invalidation_feed_up", frozenset())] == 0
    assert s[("authsvc_build_info", frozenset({("version", "0.1.0")}))] == 1
