"""The always-OK stand-in for Envoy's ext_authz HTTP protocol, on authsvc's own HTTP server.

The same stack as authsvc's HTTP listener (``authsvc.http_server``: asyncio,
uvloop, llhttp, the same limits and keep-alive), the same topology (N
processes sharing one port with SO_REUSEPORT), and a handler that answers
200 without looking at the request. Envoy in front of this server vs in
front of authsvc's listener isolates what authsvc's decision costs.

    python -m bench.ok_http_server --listen 127.0.0.1:50081 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from authsvc.http_server import HttpServer, Request, Response

OK = Response(200)


def handler(request: Request) -> Response:
    return OK


async def _serve(listen: str) -> None:
    server = HttpServer(handler)
    await server.start(listen, reuse_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port shared by every worker (SO_REUSEPORT)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers <= 1 or args.worker_index >= 0:
        import uvloop

        uvloop.run(_serve(args.listen))
        return 0
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.ok_http_server", "--listen", args.listen, "--worker-index", str(i)]
        )
        for i in range(args.workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max((child.wait() for child in children), default=0)


if __name__ == "__main__":
    sys.exit(main())
