"""The WatchDecisions adapter: fan-out events out as messages, usage reports in.

A client's cache follows this process's feed through it (``authsvc.core.fanout``).
Usage reports feed the process's ``UsageRecorder``, so ``last_used_time``
stays true for calls a client decided itself. An entry counts only when
its ``key_digest`` is a stored key's (and its ``key_id``, if set, that key's
id): a key's id is shown to every upstream, so an id alone would let anyone
who can open the stream inflate a key's usage and hide that it is unused.
A digest is checked once per process (an id and its digest never change),
from the decision cache or by one lookup under Authorize's admission and
unknown-key budget, at most ``MAX_REPORT_LOOKUPS`` per report; an entry
that cannot be checked now is dropped. A report never moves
``last_used_time`` past the server's own clock, and what is wrong in it is
skipped, not an error: the stream must not break over a report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.core.errors import Unavailable
from authsvc.core.fanout import STALL_SECONDS, Event, Fanout, Signal
from authsvc.core.keys import Reason
from authsvc.core.ports import WallClock
from authsvc.core.usage import ALLOWED, DENIED, RATE_LIMITED, UsageRecorder

log = logging.getLogger(__name__)

_HEARTBEAT = pb.WatchDecisionsResponse(heartbeat=pb.Heartbeat())
_RESET = pb.WatchDecisionsResponse(reset=pb.Reset())
#: Entries of one usage report beyond this are ignored (a report is per key, sent every few seconds).
MAX_USAGE_ENTRIES = 10_000
#: Digests not yet checked that one report may have looked up; its other unchecked entries are dropped.
MAX_REPORT_LOOKUPS = 256
#: Checked (digest, key id) pairs a process remembers; past this it starts over.
MAX_HOLDERS = 100_000
_DIGEST_BYTES = 32
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
    def __init__(
        self,
        fanout: Fanout,
        usage: UsageRecorder | None,
        clock: WallClock,
        holder: Callable[[bytes], Awaitable[str | None]],
    ) -> None:
        """``holder``: the id of the key a digest belongs to (``Authorizer.holder``)."""
        self._fanout = fanout
        self._usage = usage
        self._clock = clock
        self._holder = holder
        self._holders: dict[bytes, str] = {}

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
            lookups = 0
            for entry in request.usage[:MAX_USAGE_ENTRIES]:
                digest: bytes = entry.key_digest
                key_id = self._holders.get(digest)
                if key_id is None:
                    if len(digest) != _DIGEST_BYTES or lookups >= MAX_REPORT_LOOKUPS:
                        continue
                    lookups += 1
                    try:
                        key_id = await self._holder(digest)
                    except Unavailable:
                        continue  # at capacity, over the unknown-key budget, or no store: these calls go uncounted
                    if key_id is None:
                        continue  # no stored key has it
                    if len(self._holders) >= MAX_HOLDERS:
                        self._holders.clear()
                    self._holders[digest] = key_id
                if entry.key_id and entry.key_id != key_id:
                    continue  # the digest of one key under the id of another
                at = entry.last_used_time.seconds + entry.last_used_time.nanos / 1e9
                self._usage.touch(key_id, min(at, now))
                # Calls the client's cache decided count in GetKeyUsage like the server's own, on the day of
                # the report's last use (a report straddling midnight UTC lands on the later day).
                for reason, calls in entry.calls_by_reason.items():
                    outcome = _OUTCOMES.get(reason)
                    if outcome is not None and 0 < calls <= MAX_REPORTED_CALLS:
                        self._usage.count(key_id, min(at, now), outcome, calls)
