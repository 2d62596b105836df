"""The WatchDecisions adapter: fan-out events out as messages, usage reports in.

A client's cache follows this process's feed through it (``authsvc.core.fanout``).
Usage reports feed the process's ``UsageRecorder``, so ``last_used_time``
stays true for calls a client decided itself. An entry counts only when
its ``key_digest`` is a stored key's (and its ``key_id``, if set, that key's
id): a key's id is shown to every upstream, so an id alone would let anyone
who can open the stream inflate a key's usage and hide that it is unused.
That is all the digest proves: the digests of keys created or changed go
to every client of this stream, so a watcher can still report for those
(mTLS is what keeps the stream to known callers; see the README's threat
model).

A digest is checked once per process (an id and its digest never change),
from the decision cache or by a lookup under Authorize's admission and
unknown-key budget, batched, and within ``LOOKUP_RATE``; an entry that
cannot be checked now is dropped from its report (and logged, at most once
a minute). A report never moves ``last_used_time`` past the server's own
clock, nor for calls the server would not count, and what is wrong in it is
skipped, not an error: the stream must not break over a report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.core.errors import Unavailable
from authsvc.core.fanout import STALL_SECONDS, Event, Fanout, Signal
from authsvc.core.keys import Reason
from authsvc.core.known import TokenBucket
from authsvc.core.ports import NO_METRICS, Recorder, WallClock
from authsvc.core.usage import ALLOWED, DENIED, RATE_LIMITED, UsageRecorder

log = logging.getLogger(__name__)

_HEARTBEAT = pb.WatchDecisionsResponse(heartbeat=pb.Heartbeat())
_RESET = pb.WatchDecisionsResponse(reset=pb.Reset())
#: Entries of one usage report beyond this are ignored (a report is per key, sent every few seconds).
MAX_USAGE_ENTRIES = 10_000
#: Digests a process checks per second (and at once) with a lookup: a report's other new digests wait for the next.
LOOKUP_RATE = 2_000.0
LOOKUP_BURST = 20_000.0
#: Lookups in flight at once for one report: the store answers them in one query.
LOOKUP_BATCH = 256
#: Checked digests a process remembers (least recently reported out first): about 200 bytes each.
MAX_HOLDERS = 200_000
_DIGEST_BYTES = 32
_WARN_INTERVAL = 60.0
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
        metrics: Recorder = NO_METRICS,
    ) -> None:
        """``holder``: the id of the key a digest belongs to (``Authorizer.holder``)."""
        self._metrics = metrics
        self._fanout = fanout
        self._usage = usage
        self._clock = clock
        self._holder = holder
        #: digest -> key id, checked (an id and its digest never change).
        self._holders: OrderedDict[bytes, str] = OrderedDict()
        self._budget = TokenBucket(time.monotonic, LOOKUP_RATE, LOOKUP_BURST)
        self._dropped = 0
        self._warned_at = -_WARN_INTERVAL

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
            entries = request.usage[:MAX_USAGE_ENTRIES]
            holders = await self._holders_of({entry.key_digest for entry in entries})
            now = self._clock()
            dropped = 0
            for entry in entries:
                key_id = holders.get(entry.key_digest)
                if key_id is None or (entry.key_id and entry.key_id != key_id):
                    dropped += 1  # no digest, no stored key's, not checked yet, or under another key's id
                    continue
                at = min(now, entry.last_used_time.seconds + entry.last_used_time.nanos / 1e9)
                # Calls the client's cache decided count in GetKeyUsage like the server's own, on the day of
                # the report's last use (a report straddling midnight UTC lands on the later day). Only
                # answers the server would count move last_used_time (not revoked or expired keys).
                counted = False
                for reason, calls in entry.calls_by_reason.items():
                    outcome = _OUTCOMES.get(reason)
                    if outcome is not None and 0 < calls <= MAX_REPORTED_CALLS:
                        self._usage.count(key_id, at, outcome, calls)
                        counted = True
                if counted:
                    self._usage.touch(key_id, at)
            if dropped:
                self._metrics.usage_dropped(dropped)
                self._dropped += dropped
                if time.monotonic() - self._warned_at >= _WARN_INTERVAL:
                    self._warned_at = time.monotonic()
                    log.warning(
                        "dropped %d usage report entries so far that named no stored key by its digest, "
                        "or could not be checked yet (an old client without key_digest, or a forged report)",
                        self._dropped,
                    )

    async def _holders_of(self, digests: set[bytes]) -> dict[bytes, str]:
        """The key id of each digest that is a stored key's: remembered, else looked up within the budget.

        Lookups run ``LOOKUP_BATCH`` at a time, so the store answers each batch
        with one query; what the budget or the store cannot check now is not
        remembered, and is dropped from this report only.
        """
        memo = self._holders
        found: dict[bytes, str] = {}
        unknown: list[bytes] = []
        for digest in digests:
            if len(digest) != _DIGEST_BYTES:
                continue
            key_id = memo.get(digest)
            if key_id is not None:
                memo.move_to_end(digest)
                found[digest] = key_id
            elif self._budget.try_take():
                unknown.append(digest)
        for first in range(0, len(unknown), LOOKUP_BATCH):
            batch = unknown[first : first + LOOKUP_BATCH]
            answers = await asyncio.gather(*(self._holder(d) for d in batch), return_exceptions=True)
            for digest, answer in zip(batch, answers, strict=True):
                if isinstance(answer, Unavailable):
                    continue  # at capacity, over the unknown-key budget, or no store: not now
                if isinstance(answer, BaseException):
                    raise answer
                if answer is None:
                    continue  # no stored key has it (the decision cache now says so, until a creation)
                memo[digest] = found[digest] = answer
                if len(memo) > MAX_HOLDERS:
                    memo.popitem(last=False)
        return found
