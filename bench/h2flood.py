"""A flood of forged keys over raw HTTP/2: an attacker's cheap client, a few microseconds of Python a call.

    python -m bench.h2flood --target 127.0.0.1:50051 --connections 8 --in-flight 16 --duration 5

Why not ``bench.probeclient``: a grpc.aio client spends 100-200 us of CPU per
call, so on two cores the flood processes took the CPU the server should
have had, and "a flood at the server's full capacity" measured the
generator as much as the server. h2load is cheap but sends one body again
and again, and a forged key must be new on every call. This client writes
the frames itself:

* every request is one HEADERS frame whose HPACK block is the same bytes
  every time (static-table indexes and literals *without* indexing, so no
  dynamic table on either side) and one DATA frame carrying a new forged key
  (random base62 with a valid CRC32 checksum: well formed, never stored);
* it reads only frame headers. An answer that carried a message is
  ``replied`` (allowed or denied: forged keys are denied); one without is
  ``refused``: trailers only (gRPC core's refusal) or a DATA frame of only
  the 5-byte prefix (grpc.aio's, a status set without a message);
  RST_STREAM is ``reset``;
* it opens its own receive windows to the maximum once (2 GiB a connection,
  never replenished: far more than a run receives), answers SETTINGS and
  PING, respects the server's stream limit (once its SETTINGS arrive) and
  connection send window (a request is far below any stream window), and
  reconnects after a GOAWAY or a lost connection, after a pause when the
  connection answered nothing;
* it does not decode the answers' status: the probes tell outcomes apart.

Closed loop: each connection keeps ``--in-flight`` calls open until
``--duration`` is over. Prints one JSON line shaped like
``bench.probeclient``'s: calls (answered ones: replied or refused),
outcomes (those and the calls lost to resets and closed connections),
latency percentiles of the answered calls in ms, and the seconds of sending.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from collections import Counter

from authsvc.core.keyformat import BASE62, RANDOM_LENGTH, checksum
from bench.h2load import grpc_frame
from bench.probeclient import print_result, summary
from bench.seed import KEY_PREFIX
from bench.throughput import PATH, request_body

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MAX_WINDOW = 2**31 - 1
GRACE = 10.0
#: Outcomes that are answers from the server (timed, and counted as calls).
ANSWERS = ("replied", "refused")
#: A DATA frame of only gRPC's 5-byte prefix: grpc.aio's way to send no message with a non-OK status.
EMPTY_MESSAGE = 5
DEFAULT_WINDOW = 65_535
_MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE, _ENABLE_PUSH = 0x3, 0x4, 0x2
# One random byte -> one base62 character (slightly biased: a forgery need not be uniform, only new).
_TO_BASE62 = bytes(ord(BASE62[b % len(BASE62)]) for b in range(256))


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """A header literal without indexing, new name (RFC 7541 6.2.2), short strings only."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def header_block(authority: str) -> bytes:
    """The request's HPACK block: the same bytes for every request (nothing enters a dynamic table)."""
    path = PATH.encode()
    return (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + b"\x04" + bytes((len(path),)) + path  # :path, indexed name 4, literal value without indexing
        + b"\x01" + bytes((len(authority),)) + authority.encode()  # :authority, indexed name 1
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"te", b"trailers")
    )


def forged_key() -> str:
    """A new well-formed key with a valid checksum, unknown to every server."""
    body = f"{KEY_PREFIX}_" + os.urandom(RANDOM_LENGTH).translate(_TO_BASE62).decode("ascii")
    return body + checksum(body)


class Flood:
    """What every connection shares: the deadline, the outcomes and the latencies."""

    def __init__(self, host: str, port: int, in_flight: int, duration: float) -> None:
        self.host, self.port, self.in_flight = host, port, in_flight
        self.headers = header_block(f"{host}:{port}")
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.began = time.perf_counter()
        self.deadline = self.began + duration
        self.done = asyncio.get_running_loop().create_future()
        self.open = 0
        self.connections: set[Connection] = set()
        self.reconnecting: set[asyncio.Task[None]] = set()

    async def connect(self, after: float = 0.0) -> None:
        self.open += 1
        await asyncio.sleep(after)
        try:
            await asyncio.get_running_loop().create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.outcomes["connect_failed"] += 1
            self.closed(failed=True)

    def closed(self, failed: bool = False) -> None:
        self.open -= 1
        if time.perf_counter() < self.deadline:
            task = asyncio.ensure_future(self.connect(after=0.1 if failed else 0.0))
            self.reconnecting.add(task)
            task.add_done_callback(self.reconnecting.discard)
        elif self.open == 0 and not self.done.done():
            self.done.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection keeping ``in_flight`` calls open."""

    def __init__(self, flood: Flood) -> None:
        self.flood = flood
        self.buffer = bytearray()
        self.started: dict[int, float] = {}
        self.answered: set[int] = set()
        self.next_stream = 1
        self.max_streams = flood.in_flight
        self.send_window = DEFAULT_WINDOW
        self.going_away = False
        self.got_answer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.flood.connections.add(self)
        settings = struct.pack(">HIHI", _ENABLE_PUSH, 0, _INITIAL_WINDOW_SIZE, MAX_WINDOW)
        self.transport.write(PREFACE + frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)))
        self.fill()

    def fill(self) -> None:
        flood, now = self.flood, time.perf_counter()
        if self.going_away or now >= flood.deadline:
            if not self.started:
                self.transport.close()
            return
        out = []
        while len(self.started) < min(flood.in_flight, self.max_streams):
            message = grpc_frame(request_body(forged_key()))
            if len(message) > self.send_window:
                break
            stream, self.next_stream = self.next_stream, self.next_stream + 2
            out.append(frame(HEADERS, END_HEADERS, stream, flood.headers) + frame(DATA, END_STREAM, stream, message))
            self.send_window -= len(message)
            self.started[stream] = now
        if out:
            self.transport.write(b"".join(out))

    def finish(self, stream: int, outcome: str) -> None:
        started = self.started.pop(stream, None)
        if started is None:
            return
        self.answered.discard(stream)
        self.flood.outcomes[outcome] += 1
        if outcome in ANSWERS:
            self.got_answer = True
            self.flood.latencies.append(time.perf_counter() - started)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, replies = 0, []
        while len(buffer) - offset >= 9:
            length = int.from_bytes(buffer[offset:offset + 3], "big")
            if len(buffer) - offset - 9 < length:
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            stream = int.from_bytes(buffer[offset + 5:offset + 9], "big") & MAX_WINDOW
            payload = bytes(buffer[offset + 9:offset + 9 + length])
            offset += 9 + length
            if kind == DATA:
                if length > EMPTY_MESSAGE:
                    self.answered.add(stream)
                if flags & END_STREAM:
                    self.finish(stream, "replied" if stream in self.answered else "refused")
            elif kind == HEADERS and flags & END_STREAM:
                self.finish(stream, "replied" if stream in self.answered else "refused")
            elif kind == RST_STREAM:
                self.finish(stream, "reset")
            elif kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload) - 5, 6):
                    key, value = struct.unpack(">HI", payload[i:i + 6])
                    if key == _MAX_CONCURRENT_STREAMS:
                        self.max_streams = value
                replies.append(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                replies.append(frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE and stream == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & MAX_WINDOW
            elif kind == GOAWAY:
                self.going_away = True
                last = int.from_bytes(payload[:4], "big") & MAX_WINDOW
                for lost in [s for s in self.started if s > last]:
                    self.finish(lost, "goaway")
        del buffer[:offset]
        if replies:
            self.transport.write(b"".join(replies))
        self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self.started):
            self.finish(stream, "connection_lost")
        self.flood.connections.discard(self)
        self.flood.closed(failed=not self.got_answer)


async def drive(args: argparse.Namespace) -> dict[str, object]:
    host, _, port = args.target.rpartition(":")
    flood = Flood(host, int(port), args.in_flight, args.duration)
    for _ in range(args.connections):
        await flood.connect()
    try:  # calls still open this long after the deadline are not coming back
        await asyncio.wait_for(asyncio.shield(flood.done), args.duration + GRACE)
    except TimeoutError:
        for connection in list(flood.connections):
            connection.transport.abort()
        await flood.done
    return summary(flood.latencies, flood.outcomes, args.duration)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of a gRPC server without TLS")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=1, help="calls each connection keeps open")
    return print_result(drive(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
