"""Reading authsvc's own ``/metrics`` from the bench: the revocation-lag histogram and its quantiles."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LAG = "authsvc_invalidation_lag_seconds"

# Upper bound -> cumulative count, as in the exposition (+Inf included).
Buckets = dict[float, float]


def samples(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(port: int, name: str) -> float:
    """The sum of one metric over all its labels, e.g. every ``authsvc_authorize_total``."""
    return sum(s.value for s in samples(port) if s.name == name)


def histogram(port: int, name: str = LAG) -> Buckets:
    out: Buckets = {}
    for sample in samples(port):
        if sample.name == f"{name}_bucket":
            out[float(sample.labels["le"])] = out.get(float(sample.labels["le"]), 0.0) + sample.value
    return out


def minus(after: Buckets, before: Buckets) -> Buckets:
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def plus(a: Buckets, b: Buckets) -> Buckets:
    return {le: a.get(le, 0.0) + b.get(le, 0.0) for le in a.keys() | b.keys()}


def quantile(buckets: Buckets, q: float) -> float:
    """Prometheus's ``histogram_quantile``: linear interpolation inside the bucket that holds the rank."""
    bounds = sorted(buckets)
    count_all = buckets.get(math.inf, 0.0)
    if count_all <= 0:
        return math.nan
    rank = q * count_all
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower
