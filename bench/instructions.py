"""Instructions per Authorize, counted by valgrind's callgrind: a figure that load on the machine cannot move.

    python -m bench.instructions --scenario miss|hit|check --database-url URL [--calls 300] [--python PY]

Starts ``PY -m authsvc serve --workers 1`` (the tree on ``PY``'s path, or
from ``--tree``, another checkout) under callgrind, with the cache off (``miss``: every call
is a PostgreSQL lookup of seed key 0) or on (``hit``; ``check``: Envoy's gRPC Check of a
GET with the key in ``x-api-key``, as Envoy sends it, straight to authsvc). Once it answers,
sends ``calls`` serial Authorize calls from this process, then stays idle
for as long as the calls took. Callgrind's counters are zeroed before the
calls and dumped after each of the two windows, so the idle window's count
(heartbeats, flushes, health pings: what runs whatever the load) is
subtracted: ``(calls window - idle window) / calls`` instructions of the
server process per Authorize (PostgreSQL's own work is in its processes,
not counted). Prints one JSON line. Serial calls, so lookups are never
batched: this counts the per-call path, not throughput. Any authsvc tree
since the first version takes the same command, so two trees compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc as pb_grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext

from bench.procs import free_port
from bench.seed import seed_key

_TOTAL = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


def _instructions(dump: Path) -> int:
    found = _TOTAL.search(dump.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no summary line in {dump}")
    return int(found.group(1))


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _call(stub: pb_grpc.KeyServiceStub, key: str) -> int:
    reply: pb.AuthorizeResponse = stub.Authorize(pb.AuthorizeRequest(key=key, required_scope="read"), timeout=60)
    return int(reply.reason)


def _checker(channel: grpc.Channel, key: str) -> Callable[[], int]:
    """Envoy's Check of ``GET /items`` with the key, as Envoy 1.40 sends it; answers pb.REASON_OK for an OK."""
    request = ext.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme, http.protocol = "GET", "/items", "localhost", "http", "HTTP/1.1"
    http.headers.update({":method": "GET", ":path": "/items", ":authority": "localhost", ":scheme": "http",
                         "user-agent": "wrk", "x-forwarded-proto": "http", "x-request-id": "7a1e0c9b-0d6f-4c52",
                         "x-api-key": key})
    check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                request_serializer=ext.CheckRequest.SerializeToString,
                                response_deserializer=ext.CheckResponse.FromString)

    def call() -> int:
        reply = check(request, timeout=60)
        return pb.REASON_OK if reply.status.code == 0 else pb.REASON_UNSPECIFIED

    return call


def measure(python: str, tree: str, database_url: str, scenario: str, calls: int) -> dict[str, object]:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="authsvc-callgrind-"))
    out = work / "callgrind.out"
    env = {
        **os.environ,
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_LISTEN": f"127.0.0.1:{port}",
        "AUTHSVC_CACHE_SIZE": "0" if scenario == "miss" else "10000",
        "AUTHSVC_STORE_TIMEOUT_MS": "10000",  # callgrind runs the server some 50x slower
        "AUTHSVC_METRICS_LISTEN": "",
        "AUTHSVC_HTTP_AUTHZ_LISTEN": "",
        "AUTHSVC_LOG_LEVEL": "WARNING",
    }
    if tree:  # another checkout: its code first, whatever the interpreter has installed
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{Path(tree) / 'clients' / 'python'}"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            python, "-m", "authsvc", "serve", "--workers", "1"]
    with (work / "server.log").open("wb") as log:
        server = subprocess.Popen(argv, env=env, cwd=tree or None, stdout=subprocess.DEVNULL, stderr=log)
    key = seed_key(0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KeyServiceStub(channel)
            deadline = time.monotonic() + 600
            while True:
                try:
                    if _call(stub, key) == pb.REASON_OK:
                        break
                except grpc.RpcError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"authsvc did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
            call = _checker(channel, key) if scenario == "check" else lambda: _call(stub, key)
            for _ in range(20):  # warm: imports, first connections, any lazy set-up
                call()
            _control(server.pid, "--zero")
            started = time.monotonic()
            reasons = {call() for _ in range(calls)}
            busy = time.monotonic() - started
            _control(server.pid, "--dump=calls")
            time.sleep(busy)
            _control(server.pid, "--dump=idle")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
    calls_window, idle_window = (_instructions(d) for d in dumps[:2])
    return {
        "scenario": scenario,
        "calls": calls,
        "reasons": sorted(pb.Reason.Name(pb.Reason.ValueType(r)) for r in reasons),
        "seconds": round(busy, 1),
        "calls_window": calls_window,
        "idle_window": idle_window,
        "per_call": round((calls_window - idle_window) / calls),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("miss", "hit", "check"), default="miss")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the server")
    parser.add_argument("--tree", default="", help="another checkout to run the server from (its code first)")
    args = parser.parse_args()
    print(json.dumps(measure(args.python, args.tree, args.database_url, args.scenario, args.calls)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
