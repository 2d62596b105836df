"""The WatchDecisions adapter: fan-out events out as messages, usage reports in.

A client's cache follows this process's feed through it (``authsvc.core.fanout``).
Usage reports feed the process's ``UsageRecorder``, so ``last_used_time``
stays true for calls a client decided itself. A report is taken for what
it is worth but never moves ``last_used_time`` past the server's own clock,
and a malformed key id in it is skipped, not an error: the stream must not
break over a report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.core import validation
from authsvc.core.errors import InvalidArgument
from authsvc.core.fanout import STALL_SECONDS, Event, Fanout, Signal
from authsvc.core.keys import Reason
from authsvc.core.ports import WallClock
from authsvc.core.usage import ALLOWED, DENIED, RATE_LIMITED, UsageRecorder

log = logging.getLogger(__name__)

_HEARTBEAT = pb.WatchDecisionsResponse(heartbeat=pb.Heartbeat())
_RESET = pb.WatchDecisionsResponse(reset=pb.Reset())
#: Entries of one usage report beyond this are ignored (a report is per key, sent every few seconds).
MAX_USAGE_ENTRIES = 10_000
#: A client reports at least every 5 s; more calls than this in one entry is not a real report.
MAX_REPORTED_CALLS = 10_000_000
_OUTCOMES = {int(Reason.OK): ALLOWED, int(Reason.INSUFFICIENT_SCOPE): DENIED, int(Reason.RATE_LIMITED): RATE_LIMITED}


def _message(batch: list[Event]) -> pb.WatchDecisionsResponse:
    first = batch[0]
    if first is Signal.HEARTBEAT:
        return _HEARTBEAT
    if first is Signal.RESET:
        return _RESET
    return pb.WatchDecisionsResponse(invalidation=pb.Invalidation(digests=batch))  # type: ignore[arg-type]  # digests only


class WatchAdapter:
    def __init__(self, fanout: Fanout, usage: UsageRecorder | None, clock: WallClock) -> None:
        self._fanout = fanout
        self._usage = usage
        self._clock = clock

    async def WatchDecisions(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        watcher = self._fanout.watch()
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                batch = await watcher.next_batch()
                if not batch:
                    break
                try:
                    await asyncio.wait_for(context.write(_message(batch)), STALL_SECONDS)
                except TimeoutError:
                    watcher.drop(f"the client took no message for {STALL_SECONDS:g} s")
                    break
        finally:
            self._fanout.unwatch(watcher)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        log.info("dropped a WatchDecisions client: %s", watcher.dropped)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"WatchDecisions: {watcher.dropped}; reconnect, starting from an empty cache",
        )

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        async for request in requests:
            if not isinstance(request, pb.WatchDecisionsRequest) or self._usage is None:
                continue  # undecodable, or nothing records usage
            now = self._clock()
            for entry in request.usage[:MAX_USAGE_ENTRIES]:
                try:
                    key_id = validation.key_id(entry.key_id)
                except InvalidArgument:
                    continue
                at = entry.last_used_time.seconds + entry.last_used_time.nanos / 1e9
                self._usage.touch(key_id, min(at, now))
                # Calls the client's cache decided count in GetKeyUsage like the server's own, on the day of
                # the report's last use (a report straddling midnight UTC lands on the later day).
                for reason, calls in entry.calls_by_reason.items():
                    outcome = _OUTCOMES.get(reason)
                    if outcome is not None and 0 < calls <= MAX_REPORTED_CALLS:
                        self._usage.count(key_id, min(at, now), outcome, calls)
