"""A tiny grpc.aio service protected by authsvc's ``AsyncAuthzServerInterceptor``.

Run it against a running authsvc (``authsvc serve`` listens on localhost:50051):

    python clients/python/examples/grpc_service.py serve --authsvc localhost:50051 --listen localhost:50061

Then call it with a key (create one with grpcurl as in the main README):

    python clients/python/examples/grpc_service.py call --target localhost:50061 --key "$KEY" SayHello
    python clients/python/examples/grpc_service.py call --target localhost:50061 --key "$KEY" Forget   # needs write
    python clients/python/examples/grpc_service.py call --target localhost:50061 Ping                 # public

``demo.v1.Greeter`` has no .proto of its own: it speaks
``google.protobuf.StringValue`` (shipped with protobuf), so the example needs
nothing beyond the client package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import grpc
from authsvc_client import AsyncAuthzServerInterceptor, AsyncClient, current_principal
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "demo.v1.Greeter"
SCOPES = {f"/{SERVICE}/SayHello": "read", f"/{SERVICE}/Forget": "write"}
PUBLIC = {f"/{SERVICE}/Ping"}


async def say_hello(request: StringValue, context: grpc.aio.ServicerContext[StringValue, StringValue]) -> StringValue:
    principal = current_principal()
    assert principal is not None  # the interceptor only lets identified keys through
    name = request.value or principal.user_id
    return StringValue(value=f"hello {name} (org {principal.org_id}, key {principal.key_prefix}...)")


async def forget(request: StringValue, context: grpc.aio.ServicerContext[StringValue, StringValue]) -> StringValue:
    return StringValue(value=f"forgot {request.value!r}")


async def ping(request: StringValue, context: grpc.aio.ServicerContext[StringValue, StringValue]) -> StringValue:
    return StringValue(value="pong")


def greeter() -> grpc.GenericRpcHandler:
    def handler(behavior: Callable[..., Awaitable[StringValue]]) -> grpc.RpcMethodHandler[StringValue, StringValue]:
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=StringValue.FromString, response_serializer=StringValue.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        SERVICE, {"SayHello": handler(say_hello), "Forget": handler(forget), "Ping": handler(ping)}
    )


async def serve(authsvc: str, listen: str) -> None:
    async with AsyncClient(authsvc) as client:
        server = grpc.aio.server(interceptors=[AsyncAuthzServerInterceptor(client, SCOPES, public=PUBLIC)])
        server.add_generic_rpc_handlers([greeter()])
        port = server.add_insecure_port(listen)
        await server.start()
        print(f"demo.v1.Greeter listening on port {port}, authorizing with authsvc at {authsvc}", flush=True)
        await server.wait_for_termination()


async def call(target: str, key: str | None, method: str, name: str) -> int:
    metadata = (("x-api-key", key),) if key else ()
    async with grpc.aio.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        try:
            reply = await rpc(StringValue(value=name), metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}")
            return 1
    print(reply.value)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_args = commands.add_parser("serve", help="run the protected service")
    serve_args.add_argument("--authsvc", default="localhost:50051", help="authsvc address")
    serve_args.add_argument("--listen", default="localhost:50061", help="address to serve on")
    call_args = commands.add_parser("call", help="call the protected service")
    call_args.add_argument("--target", default="localhost:50061")
    call_args.add_argument("--key", help="the API key (sent as x-api-key metadata)")
    call_args.add_argument("method", choices=["SayHello", "Forget", "Ping"])
    call_args.add_argument("name", nargs="?", default="")
    args = parser.parse_args()
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the example stops
            asyncio.run(serve(args.authsvc, args.listen))
        return 0
    return asyncio.run(call(args.target, args.key, args.method, args.name))


if __name__ == "__main__":
    sys.exit(main())
