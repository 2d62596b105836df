"""gRPC load with h2load: one fixed request body, many connections and streams.

h2load speaks plain HTTP/2, which is all gRPC is on the wire: a POST to
``/<service>/<method>`` with ``content-type: application/grpc`` and a body of
length-prefixed messages (1 byte "compressed" flag, 4 bytes big-endian
length, the serialized message). grpc-status travels in trailers, which
h2load does not look at, so callers verify answers separately: real client
calls before a run, and the response bytes per request after it (every
answer of a run must be the expected message, byte for byte the same size).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class LoadResult:
    """One h2load run (or several in parallel, summed)."""

    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int
    seconds: float
    latencies_us: list[int] = field(default_factory=list, repr=False)

    @property
    def data_bytes_per_response(self) -> float:
        return self.data_bytes / self.done if self.done else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"\((\d+)\) data")


def parse(output: str) -> LoadResult:
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    status = _STATUS.search(output)
    data = _DATA.search(output)
    if not (finished and requests and status and data):
        raise RuntimeError(f"cannot parse h2load output:\n{output[-2000:]}")
    return LoadResult(
        rps=float(finished.group(2)),
        done=int(requests.group(3)),
        succeeded=int(requests.group(4)),
        failed=int(requests.group(5)),
        errored=int(requests.group(6)),
        status_2xx=int(status.group(1)),
        data_bytes=int(data.group(1)),
        seconds=float(finished.group(1)),
    )


def command(
    port: int, path: str, data_file: Path, *, connections: int, streams: int, duration: float,
    log_file: Path | None = None, rps: int | None = None,
) -> list[str]:
    """``rps``: open loop, that many requests a second per connection (h2load's ``--rps``)."""
    argv = [
        "h2load", "-t", "1", "-c", str(connections), "-m", str(streams),
        "-D", f"{duration:g}", "-d", str(data_file),
    ]
    if rps is not None:
        argv.append(f"--rps={rps}")
    for header in GRPC_HEADERS:
        argv += ["-H", header]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    return [*argv, f"http://127.0.0.1:{port}{path}"]


def run(
    ports: Sequence[int], path: str, data_file: Path, *, connections: int, streams: int, duration: float,
    warmup: float, log_dir: Path | None = None, during: Callable[[], object] | None = None,
    prefix: Sequence[str] = (),
) -> LoadResult:
    """h2load against ``ports``; with several ports, one h2load per port in parallel (connections split evenly).

    Warm-up is a separate, discarded h2load run just before the measured one
    (h2load's own ``--warm-up-time`` counts warm-up bytes in its traffic
    totals but not in its request counts, which would break the per-answer
    size check). ``during`` is called shortly after the measured run starts,
    while the load runs (e.g. to sample CPU time or the connection split).
    ``prefix`` goes before h2load's command (``taskset -c 0``: the generator on a core of its own).
    """
    if warmup > 0:
        run(ports, path, data_file, connections=connections, streams=streams, duration=warmup, warmup=0,
            prefix=prefix)
    per_port = max(1, connections // len(ports))
    logs = [log_dir / f"h2load-{port}.tsv" if log_dir is not None else None for port in ports]
    procs = [
        subprocess.Popen(
            [*prefix,
             *command(port, path, data_file, connections=per_port, streams=streams, duration=duration, log_file=log)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for port, log in zip(ports, logs, strict=True)
    ]
    try:
        if during is not None:
            time.sleep(0.3)
            during()
        outputs = [p.communicate(timeout=duration + 60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"h2load failed ({p.returncode}):\n{out[-2000:]}")
    parts = [parse(out) for out in outputs]
    total = LoadResult(
        rps=sum(r.rps for r in parts),
        done=sum(r.done for r in parts),
        succeeded=sum(r.succeeded for r in parts),
        failed=sum(r.failed for r in parts),
        errored=sum(r.errored for r in parts),
        status_2xx=sum(r.status_2xx for r in parts),
        data_bytes=sum(r.data_bytes for r in parts),
        seconds=statistics.fmean(r.seconds for r in parts),
    )
    for log in logs:
        if log is not None and log.exists():
            for line in log.read_text().splitlines():
                cols = line.split("\t")
                if len(cols) >= 3 and cols[1] == "200":
                    total.latencies_us.append(int(cols[2]))
            log.unlink()
    return total
