"""Multi-process grpc.aio serving for the bench's stand-in servers.

The baseline servers must run in the same topology as ``authsvc serve
--workers N``: N processes, uvloop, every one listening on one shared port
with SO_REUSEPORT (the kernel spreads *connections*), and, when a base port
is given, worker i also on its own port ``base + i`` so Envoy can list the
workers as separate endpoints. Only the handler differs.

Workers are separate interpreters started with ``subprocess`` (not fork:
grpcio does not survive fork), and the parent forwards SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

HandlerFactory = Callable[[], grpc.GenericRpcHandler]


def constant_handler(service: str, method: str, request_type: type[Message], response: Message) -> HandlerFactory:
    """A stand-in for ``/service/method`` that parses each request (as authsvc must) and answers ``response``."""

    async def answer(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        return response

    def handler() -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            service,
            {
                method: grpc.unary_unary_rpc_method_handler(
                    answer,
                    request_deserializer=request_type.FromString,
                    response_serializer=type(response).SerializeToString,
                )
            },
        )

    return handler


def _parse(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", required=True, help="host:port shared by every worker (SO_REUSEPORT)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=0, help="worker i also listens on 127.0.0.1:<base+i>")
    parser.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def _serve_one(listen: str, extra_port: int, factory: HandlerFactory) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers([factory()])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if not server.add_insecure_port(listen):
        raise SystemExit(f"cannot listen on {listen}")
    if extra_port and not server.add_insecure_port(f"127.0.0.1:{extra_port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{extra_port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def _install_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(module: str, factory: HandlerFactory, description: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of a stand-in server; ``module`` is how a worker re-runs it (``python -m module``)."""
    args = _parse(argv, description)
    if args.workers <= 1 or args.worker_index >= 0:
        index = max(args.worker_index, 0)
        _install_uvloop()
        asyncio.run(_serve_one(args.listen, args.base_port + index if args.base_port else 0, factory))
        return 0
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--listen",
                args.listen,
                "--workers",
                str(args.workers),
                "--base-port",
                str(args.base_port),
                "--worker-index",
                str(i),
            ]
        )
        for i in range(args.workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
