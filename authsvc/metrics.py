"""Prometheus metrics: counted cheaply in plain Python, exported by prometheus-client.

The hot path (one call per Authorize) pays for a few dict and list updates,
never for a prometheus-client ``Counter.inc()`` with its label lookup and
lock: ``Metrics`` keeps plain ints, and ``Collector`` turns a ``snapshot()``
of them into metric families only when Prometheus scrapes.

Processes. With one process the ``/metrics`` endpoint (a thread) asks the
event loop for a snapshot at each scrape, so values are current and read on
the loop's own thread. With ``--workers N`` every worker writes its snapshot
to a file in a directory private to this run every ``FLUSH_SECONDS`` (and
once more when it stops); the supervisor serves ``/metrics`` and adds the
files up, so one scrape reports the totals of all workers, at most
``FLUSH_SECONDS`` old. Workers are not restarted on their own (a crashed
worker stops the service), so the totals start from zero whenever the
service starts, which Prometheus's ``rate()`` reads as a counter reset.

What is exported is fixed by the names below; labels carry only fixed
vocabularies (reasons, transports, operations, gRPC codes): never a key, a
prefix, a key id, an org id or a user id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from authsvc import __version__
from authsvc.core.errors import ConfigError
from authsvc.core.keys import Reason
from authsvc.core.ports import NO_METRICS as NO_METRICS
from authsvc.core.ports import Recorder as Recorder
from authsvc.tlsfiles import Reloading, TlsFiles, http_contexts

log = logging.getLogger(__name__)

# Fine below 1 ms: a cache hit takes tens of microseconds.
DURATION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
# Fine around the few milliseconds a notification takes, so p50 is read to ~1 ms.
LAG_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FLUSH_SECONDS = 0.5
#: A scrape's request must arrive, and its answer be taken, within this (Prometheus's own default timeout).
REQUEST_SECONDS = 10.0

# One histogram: counts per bucket (the last one is +Inf), then the sum.
Histogram = list[float]
Snapshot = dict[str, Any]


def _histogram(bounds: Sequence[float]) -> Histogram:
    return [0.0] * (len(bounds) + 2)


class Metrics:
    """One process's counts, in plain ints and lists (see the module docstring).

    Gauges (cache entries, feed state, pool, the Redis fallback count that
    the rate limiter keeps anyway) are read from their owners through
    ``gauges`` at snapshot time, so they cost nothing between scrapes.
    """

    def __init__(self) -> None:
        # Authorize answers: per transport, one duration histogram per
        # (reason, cache state) slot, indexed by ``reason * 3 + state``. The
        # counters by reason and the histograms by cache are sums of these,
        # made at snapshot time; so a call costs one dict lookup (by the
        # transport string), list indexing (an IntEnum indexes a list at C
        # speed, where hashing one would run Python code) and a bisect.
        self._answers: dict[str, list[Histogram]] = {}
        self._failures: dict[tuple[str, str], Histogram] = {}
        self._lag = _histogram(LAG_BUCKETS)
        self.feed_resets = 0
        self.usage_entries_dropped = 0
        self._batches = _histogram(BATCH_BUCKETS)
        self._store_errors: dict[str, int] = {}
        self._management: dict[tuple[str, str], int] = {}
        self.gauges: Callable[[], Mapping[str, float]] = dict

    def decided(self, reason: Reason, transport: str, cached: bool | None, seconds: float) -> None:
        slots = self._answers.get(transport)
        if slots is None:
            slots = self._answers[transport] = [_histogram(DURATION_BUCKETS) for _ in range(len(Reason) * 3)]
        durations = slots[reason * 3 + (0 if cached is None else 1 if cached else 2)]
        durations[bisect_left(DURATION_BUCKETS, seconds)] += 1
        durations[-1] += seconds

    def failed(self, reason: str, transport: str, seconds: float) -> None:
        durations = self._failures.get((reason, transport))
        if durations is None:
            durations = self._failures[(reason, transport)] = _histogram(DURATION_BUCKETS)
        durations[bisect_left(DURATION_BUCKETS, seconds)] += 1
        durations[-1] += seconds

    def invalidated(self, lag_seconds: float) -> None:
        lag_seconds = max(lag_seconds, 0.0)  # clocks a little apart must not make a negative lag
        self._lag[bisect_left(LAG_BUCKETS, lag_seconds)] += 1
        self._lag[-1] += lag_seconds

    def feed_reset(self) -> None:
        self.feed_resets += 1

    def usage_dropped(self, entries: int) -> None:
        self.usage_entries_dropped += entries

    def lookup_batch(self, size: int) -> None:
        self._batches[bisect_left(BATCH_BUCKETS, size)] += 1
        self._batches[-1] += size

    def store_error(self, operation: str) -> None:
        self._store_errors[operation] = self._store_errors.get(operation, 0) + 1

    def managed(self, method: str, code: str) -> None:
        key = (method, code)
        self._management[key] = self._management.get(key, 0) + 1

    def snapshot(self) -> Snapshot:
        """Plain JSON-able data: what a worker writes to its file and the collector reads."""
        authorize: list[list[Any]] = []
        durations: dict[tuple[str, str], Histogram] = {}
        hits = misses = 0.0
        rows = [
            (Reason(index // 3).code, transport, index % 3, histogram)
            for transport, slots in self._answers.items()
            for index, histogram in enumerate(slots)
        ]
        rows += [(reason, transport, 0, histogram) for (reason, transport), histogram in self._failures.items()]
        for reason, transport, state, histogram in rows:
            count = sum(histogram[:-1])
            if not count:
                continue
            authorize.append([reason, transport, count])
            if state == 1:
                hits += count
            elif state == 2:
                misses += count
            into = durations.setdefault((transport, "miss" if state == 2 else "hit"), _histogram(DURATION_BUCKETS))
            into[:] = [a + b for a, b in zip(into, histogram, strict=True)]
        return {
            "authorize": authorize,
            "duration": [[*k, v] for k, v in durations.items()],
            "cache_hits": hits,
            "cache_misses": misses,
            "lag": list(self._lag),
            "feed_resets": self.feed_resets,
            "usage_entries_dropped": self.usage_entries_dropped,
            "batches": list(self._batches),
            "store_errors": [[k, v] for k, v in self._store_errors.items()],
            "management": [[*k, v] for k, v in self._management.items()],
            "gauges": dict(self.gauges()),
        }


def _merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Totals over processes: counters and histograms add up, gauges too but feed_up and known_loaded (the minimum)."""
    authorize: dict[tuple[str, ...], float] = {}
    duration: dict[tuple[str, ...], Histogram] = {}
    errors: dict[tuple[str, ...], float] = {}
    management: dict[tuple[str, ...], float] = {}
    lag = _histogram(LAG_BUCKETS)
    batches = _histogram(BATCH_BUCKETS)
    scalars = {"cache_hits": 0.0, "cache_misses": 0.0, "feed_resets": 0.0, "usage_entries_dropped": 0.0}
    gauges: dict[str, float] = {}
    count = 0
    for snap in snapshots:
        count += 1
        for table, rows in ((authorize, snap["authorize"]), (errors, snap["store_errors"])):
            for *labels, value in rows:
                table[tuple(labels)] = table.get(tuple(labels), 0) + value
        for *labels, value in snap["management"]:
            management[tuple(labels)] = management.get(tuple(labels), 0) + value
        for *labels, histogram in snap["duration"]:
            into = duration.setdefault(tuple(labels), _histogram(DURATION_BUCKETS))
            into[:] = [a + b for a, b in zip(into, histogram, strict=True)]
        lag[:] = [a + b for a, b in zip(lag, snap["lag"], strict=True)]
        batches[:] = [a + b for a, b in zip(batches, snap["batches"], strict=True)]
        for name in scalars:
            scalars[name] += snap.get(name, 0)  # a worker of the release before may lack a newer one
        for name, value in snap["gauges"].items():
            if name in ("feed_up", "known_loaded"):
                gauges[name] = min(gauges.get(name, value), value)
            else:
                gauges[name] = gauges.get(name, 0) + value
    return {
        "authorize": authorize,
        "duration": duration,
        "store_errors": errors,
        "management": management,
        "lag": lag,
        "batches": batches,
        **scalars,
        "gauges": gauges,
        "processes": count,
    }


class Collector:
    """A prometheus-client collector over snapshots, taken when Prometheus scrapes."""

    def __init__(self, snapshots: Callable[[], list[Snapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = _merge(self._snapshots())
        g = m["gauges"]

        def histogram(
            family: HistogramMetricFamily, labels: list[str], values: Histogram, bounds: Sequence[float]
        ) -> None:
            cumulative, buckets = 0.0, []
            for bound, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), values[:-1], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(labels, buckets, values[-1])

        info = GaugeMetricFamily("authsvc_build_info", "The running authsvc version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        decisions = CounterMetricFamily(
            "authsvc_authorize",
            "Authorize answers by reason (and the errors unavailable, at_capacity, unknown_key_budget, "
            "invalid_argument), by transport.",
            labels=["reason", "transport"],
        )
        for (reason, transport), value in sorted(m["authorize"].items()):
            decisions.add_metric([reason, transport], value)
        yield decisions
        durations = HistogramMetricFamily(
            "authsvc_authorize_duration_seconds",
            "Time from Authorize's start in the core to its answer; cache=miss when the store was read.",
            labels=["transport", "cache"],
        )
        for labels, values in sorted(m["duration"].items()):
            histogram(durations, list(labels), values, DURATION_BUCKETS)
        yield durations
        yield GaugeMetricFamily(
            "authsvc_cache_entries", "Cached key records (known and unknown keys).", g.get("cache_entries", 0)
        )
        yield CounterMetricFamily("authsvc_cache_hits", "Key lookups answered from the cache.", m["cache_hits"])
        yield CounterMetricFamily("authsvc_cache_misses", "Key lookups that read the store.", m["cache_misses"])
        lag = HistogramMetricFamily(
            "authsvc_invalidation_lag_seconds",
            "From the commit of a create or revoke (database clock) to the eviction in this process, per process.",
        )
        histogram(lag, [], m["lag"], LAG_BUCKETS)
        yield lag
        yield GaugeMetricFamily(
            "authsvc_invalidation_feed_up",
            "1 while every process's invalidation feed is subscribed and fresh; 0 while any cache is off.",
            g.get("feed_up", 0),
        )
        yield CounterMetricFamily(
            "authsvc_invalidation_feed_resets", "Times a process lost its invalidation feed.", m["feed_resets"]
        )
        yield CounterMetricFamily(
            "authsvc_usage_report_entries_dropped",
            "WatchDecisions usage-report entries not counted: no stored key's digest, or not checked yet.",
            m["usage_entries_dropped"],
        )
        yield GaugeMetricFamily(
            "authsvc_known_digests_loaded",
            "1 while every process has loaded its table of stored digests (lookups of unknown keys are budgeted).",
            g.get("known_loaded", 0),
        )
        batches = HistogramMetricFamily("authsvc_store_lookup_batch_size", "Keys per batched store lookup query.")
        histogram(batches, [], m["batches"], BATCH_BUCKETS)
        yield batches
        errors = CounterMetricFamily(
            "authsvc_store_errors", "Store calls that failed or timed out, by operation.", labels=["operation"]
        )
        for (operation,), value in sorted(m["store_errors"].items()):
            errors.add_metric([operation], value)
        yield errors
        pool = GaugeMetricFamily("authsvc_db_pool_connections", "Pooled PostgreSQL connections.", labels=["state"])
        pool.add_metric(["idle"], g.get("pool_idle", 0))
        pool.add_metric(["in_use"], g.get("pool_in_use", 0))
        yield pool
        yield CounterMetricFamily(
            "authsvc_ratelimit_fallback",
            "Redis failures after which rate limits were counted locally.",
            g.get("ratelimit_fallback", 0),
        )
        management = CounterMetricFamily(
            "authsvc_management_requests",
            "CreateKey, GetKey, ListKeys and RevokeKey calls by gRPC status code.",
            labels=["method", "code"],
        )
        for (method, code), value in sorted(m["management"].items()):
            management.add_metric([method, code], value)
        yield management


# -- the processes' side -------------------------------------------------------


def live_snapshots(metrics: Metrics, loop: asyncio.AbstractEventLoop) -> Callable[[], list[Snapshot]]:
    """Snapshots taken on the event loop's thread (the loop owns the counts and the gauges' objects)."""

    async def take() -> Snapshot:
        return metrics.snapshot()

    def snapshots() -> list[Snapshot]:
        return [asyncio.run_coroutine_threadsafe(take(), loop).result(timeout=5)]

    return snapshots


def file_snapshots(directory: Path) -> Callable[[], list[Snapshot]]:
    """The supervisor's view: every worker's last written snapshot."""

    def snapshots() -> list[Snapshot]:
        out = []
        for path in sorted(directory.glob("worker-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # replaced between glob and read: the next scrape sees it
                continue
        return out

    return snapshots


def write_snapshot(metrics: Metrics, directory: Path, worker: int) -> None:
    """Atomically (write, then rename), so the supervisor never reads half a file."""
    path = directory / f"worker-{worker}.json"
    tmp = directory / f".worker-{worker}.tmp"
    tmp.write_text(json.dumps(metrics.snapshot()))
    os.replace(tmp, path)


async def flush_forever(metrics: Metrics, directory: Path, worker: int) -> None:
    while True:
        write_snapshot(metrics, directory, worker)
        await asyncio.sleep(FLUSH_SECONDS)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the stdlib's parameter name
        pass  # a scrape every few seconds is not worth a log line


class _Server(WSGIServer):
    """One thread per scrape; with ``tls``, every connection TLS, with the context current when it arrived.

    ``get_request`` (the accept loop) only wraps the accepted socket, which
    does no I/O; the handshake runs in the connection's own thread, under
    ``handshake_timeout``, so a slow or plaintext client never stalls the
    listener. A failed handshake closes the connection, logged at debug
    level only. Open connections keep the context they were made with.
    """

    daemon_threads = True
    tls: Reloading[ssl.SSLContext] | None = None
    handshake_timeout = 5.0

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.tls is None:
            return sock, address
        try:
            return self.tls.current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
        except OSError:  # the client already left; socketserver drops a request whose get_request fails
            sock.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per scrape, so a slow client does not hold up the next.
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.settimeout(self.handshake_timeout)
                try:
                    request.do_handshake()
                except OSError as exc:  # plaintext, no or a foreign client certificate, a timeout, a reset
                    log.debug("TLS handshake on the metrics listener with %s failed: %r", client_address, exc)
                    return
            # A client that connects (and shakes hands) but never sends its request, or never reads the answer,
            # must not hold a thread and a descriptor for ever.
            request.settimeout(REQUEST_SECONDS)
            self.finish_request(request, client_address)
        except Exception:  # a client hanging up mid-answer
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """``GET /metrics`` on ``address`` (host:port), in a daemon thread; anything else is 404.

    ``tls``: served over TLS only (mTLS with a client CA), following the files as every listener does.
    """

    def __init__(
        self,
        address: str,
        snapshots: Callable[[], list[Snapshot]],
        *,
        tls: TlsFiles | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(snapshots))
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"authsvc serves its metrics on /metrics\n"]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        contexts = http_contexts(tls, "the metrics listener") if tls is not None else None
        try:
            self._server = make_server(host, int(port), app, server_class=server_class, handler_class=_QuietHandler)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"cannot listen on {address} ({reason}); set AUTHSVC_METRICS_LISTEN") from None
        self._server.tls = contexts
        self._server.handshake_timeout = handshake_timeout
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="authsvc-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
