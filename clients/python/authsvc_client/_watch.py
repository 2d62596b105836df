"""The WatchDecisions stream that keeps a client's ``LocalCache`` true: asyncio and thread flavours.

Opened on the client's first call and kept open: on any end or error the
cache is dropped at once and the stream reconnects with a backoff (50 ms
doubling to 1 s, each wait jittered to between half and all of it); the cache starts again from empty on authsvc's next
heartbeat. Usage reports go up every ``REPORT_SECONDS`` (the contract says
at least every 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from authsvc_client._localcache import LocalCache
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1.authsvc_pb2_grpc import KeyServiceStub

REPORT_SECONDS = 2.0
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0


def jittered(backoff: float) -> float:
    """Between half and all of ``backoff``: clients that lost their streams together (a server restarted)
    must not all come back at the same instant, where the server's queue would refuse part of them again."""
    return backoff * (0.5 + random.random() / 2)  # noqa: S311  (spreading retries, not a secret)


def report(local: LocalCache) -> pb.WatchDecisionsRequest:
    request = pb.WatchDecisionsRequest()
    for key_id, (last, counts, digest) in local.drain_usage().items():
        entry = request.usage.add(key_id=key_id, key_digest=digest)
        entry.last_used_time.FromMicroseconds(round(last * 1_000_000))
        for reason, n in counts.items():
            entry.calls_by_reason[int(reason)] = n
    return request


def apply(local: LocalCache, message: pb.WatchDecisionsResponse) -> None:
    kind = message.WhichOneof("event")
    if kind == "heartbeat":
        local.heartbeat()
    elif kind == "invalidation":
        local.evict(list(message.invalidation.digests))
    else:  # a reset, or an event this client does not know: in doubt, drop everything
        local.reset()


class AsyncWatch:
    """The stream as a task on the client's event loop."""

    def __init__(self, local: LocalCache) -> None:
        self.local = local
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def ensure(self, channel: grpc.aio.Channel) -> None:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(channel), name="authsvc-watch")

    async def stop(self) -> None:
        # grpc.aio may turn the cancellation of a read into an RpcError (CANCELLED), which the loop
        # swallows like any lost stream: the flag ends the loop even then.
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
        self.local.lost()

    async def _run(self, channel: grpc.aio.Channel) -> None:
        stub = KeyServiceStub(channel)
        backoff = _FIRST_BACKOFF
        while not self._stopping:
            call: Any = stub.WatchDecisions()
            self.local.connecting()
            reporter = asyncio.create_task(self._report(call))
            try:
                async for message in call:
                    apply(self.local, message)
                    backoff = _FIRST_BACKOFF
            except grpc.RpcError:
                pass  # authsvc unreachable or dropped us: calls go to authsvc until we are back
            finally:
                self.local.lost()
                reporter.cancel()
                call.cancel()
            if self._stopping:
                return
            await asyncio.sleep(jittered(backoff))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _report(self, call: Any) -> None:
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            while True:
                await asyncio.sleep(REPORT_SECONDS)
                await call.write(report(self.local))


class ThreadWatch:
    """The stream on a daemon thread, for the blocking ``Client``."""

    def __init__(self, local: LocalCache, channel: grpc.Channel) -> None:
        self.local = local
        self._stub = KeyServiceStub(channel)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._call: Any = None

    def ensure(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="authsvc-watch", daemon=True)
                    self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(5)
        self.local.lost()

    def _requests(self) -> Iterator[pb.WatchDecisionsRequest]:
        while not self._stopping.wait(REPORT_SECONDS):
            yield report(self.local)

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF
        while not self._stopping.is_set():
            self.local.connecting()
            try:
                self._call = self._stub.WatchDecisions(self._requests())
                for message in self._call:
                    apply(self.local, message)
                    backoff = _FIRST_BACKOFF
            except grpc.RpcError:
                pass
            finally:
                self.local.lost()
            if self._stopping.wait(jittered(backoff)):
                return
            backoff = min(backoff * 2, _MAX_BACKOFF)
