"""The ext_authz HTTP listener's server, over real sockets: keep-alive, order, limits, malformed input, slow clients.

Every client here writes raw bytes, so each case is exactly the shape it
names, and reads with a deadline, so none can hang.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest

from authsvc.http_server import HttpServer, Limits, Request, Response
from tests.extauthz.rawhttp import DEADLINE, Answer, Client, one
from tests.support import closed_within
from tests.tls import CertificateAuthority

LIMITS = Limits(
    max_request_target=1024,
    max_headers=20,
    max_header_bytes=2048,
    max_body_bytes=256,
    request_timeout=0.5,
    idle_timeout=1.0,
    max_pipeline=4,
)


async def _slow(request: Request) -> Response:
    await asyncio.sleep(0.1)
    return Response(201, (("x-path", request.path),))


def handler(request: Request) -> Response | Awaitable[Response]:
    """Echoes the path and headers it saw; ``/slow`` answers after a real suspension, ``/boom`` raises."""
    if request.path.startswith("/slow"):
        return _slow(request)
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    body = json.dumps({"method": request.method, "headers": dict(request.headers)}).encode()
    return Response(200, (("x-path", request.path),), body)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = HttpServer(handler, LIMITS)
    bound = await server.start("127.0.0.1:0")
    yield bound
    await server.stop(grace=1.0)


GET = b"GET /a HTTP/1.1\r\nHost: authz\r\n\r\n"


async def test_keep_alive_serves_many_requests_on_one_connection(port: int) -> None:
    client = await Client.connect(port)
    try:
        for i in range(3):
            await client.send(f"GET /n{i} HTTP/1.1\r\nHost: authz\r\n\r\n".encode())
            answer = await client.answer()
            assert (answer.status, answer.headers["x-path"]) == (200, f"/n{i}")
            assert "connection" not in answer.headers
    finally:
        client.close()


async def test_headers_are_lower_case_and_repeated_ones_joined_by_commas(port: int) -> None:
    answer, _ = await one(
        port, b"GET /a HTTP/1.1\r\nHost: authz\r\nX-Api-Key: one\r\nx-api-key: two\r\nConnection: close\r\n\r\n"
    )
    assert json.loads(answer.body)["headers"]["x-api-key"] == "one,two"


async def test_pipelined_requests_are_answered_in_order_even_when_the_first_waits(port: int) -> None:
    """A slow (suspending) answer holds back the quick ones behind it: HTTP/1.1 pipelining is strictly ordered."""
    client = await Client.connect(port)
    try:
        await client.send(
            b"GET /slow1 HTTP/1.1\r\nHost: a\r\n\r\nGET /quick HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /slow2 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /head HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        paths = [(await client.answer(head=i == 3)) for i in range(5)]
        # HEAD says how long the GET body would be, but sends none: the next bytes are the next status line.
        assert paths[3].headers["content-length"] != "0"
        assert paths[3].body == b""
        assert [answer.headers["x-path"] for answer in paths] == ["/slow1", "/quick", "/slow2", "/head", "/last"]
    finally:
        client.close()


async def test_http_1_0_and_connection_close_are_answered_then_closed(port: int) -> None:
    for data in (b"GET /a HTTP/1.0\r\n\r\n", b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET):
        answer, closed = await one(port, data)
        assert answer.status == 200
        assert answer.headers["connection"] == "close"
        assert closed  # nothing after the request that asked to close is answered


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ("bare LF line endings", b"GET /a HTTP/1.1\nHost: a\n\n"),
        ("bare CR inside the head", b"GET /a HTTP/1.1\rHost: a\r\n\r\n"),
        ("obs-fold continuation line", b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n"),
        ("space before the colon", b"GET /a HTTP/1.1\r\nHost : a\r\n\r\n"),
        ("NUL in a header value", b"GET /a HTTP/1.1\r\nX-A: a\x00b\r\n\r\n"),
        (
            "Content-Length and Transfer-Encoding",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ),
        ("two equal Content-Length", b"GET /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"),
        ("two different Content-Length", b"GET /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"),
        ("a Content-Length list", b"GET /a HTTP/1.1\r\nContent-Length: 0, 0\r\n\r\n"),
        ("Transfer-Encoding other than chunked", b"POST /a HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"),
        ("an upgrade", b"GET /a HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
        ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\n\r\n"),
        ("HTTP/0.9", b"GET /a\r\n\r\n"),
        ("TLS instead of HTTP", b"\x16\x03\x01\x00\xa5\x01\x00\x00"),
    ],
)
async def test_malformed_and_smuggling_shapes_get_400_and_the_connection_closed(
    port: int, shape: str, data: bytes
) -> None:
    """Nothing that two parsers could read differently is answered as a request; the pipelined GET behind it neither."""
    answer, closed = await one(port, data + GET)
    assert answer.status == 400, shape
    assert answer.headers["connection"] == "close"
    assert json.loads(answer.body)["error"]["code"] == "bad_request"
    assert closed


async def test_a_refusal_comes_after_the_answers_to_the_good_requests_before_it(port: int) -> None:
    client = await Client.connect(port)
    try:
        await client.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n" + GET + b"GET /a HTTP/1.1\nHost: a\n\n")
        assert [(await client.answer()).status for _ in range(3)] == [201, 200, 400]
        assert await client.closed()
    finally:
        client.close()


async def test_leading_empty_lines_are_ignored_and_bare_crlf_alone_is_closed_when_idle(port: int) -> None:
    answer, _ = await one(port, b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.status == 200
    client = await Client.connect(port)
    try:
        started = time.monotonic()
        for _ in range(5):  # empty lines are not requests: they do not keep the connection alive
            await client.send(b"\r\n")
            await asyncio.sleep(0.1)
        assert await client.closed()
        assert time.monotonic() - started < LIMITS.idle_timeout + 1.0
    finally:
        client.close()


async def test_a_request_target_past_the_limit_gets_414(port: int) -> None:
    answer, closed = await one(port, b"GET /" + b"a" * LIMITS.max_request_target + b" HTTP/1.1\r\n\r\n")
    assert answer.status == 414
    assert closed


async def test_a_request_target_at_the_limit_is_served(port: int) -> None:
    path = b"/" + b"a" * (LIMITS.max_request_target - 1)
    answer, _ = await one(port, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.status == 200
    assert answer.headers["x-path"] == path.decode()


async def test_a_header_flood_gets_431(port: int) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers + 1))
    answer, closed = await one(port, b"GET /a HTTP/1.1\r\n" + lines + b"\r\n")
    assert answer.status == 431
    assert closed


async def test_headers_larger_than_the_limit_get_431(port: int) -> None:
    answer, closed = await one(port, b"GET /a HTTP/1.1\r\nX-Big: " + b"v" * LIMITS.max_header_bytes + b"\r\n\r\n")
    assert answer.status == 431
    assert closed


async def trickle(client: Client, pieces: Iterator[bytes], pause: float) -> int:
    """Send ``pieces`` until the server stops reading; the bytes sent."""
    sent = 0
    for piece in pieces:
        try:
            await client.send(piece)
        except (ConnectionResetError, BrokenPipeError):
            break
        sent += len(piece)
        await asyncio.sleep(pause)
    return sent


async def answer_while_sending(client: Client, pieces: Iterator[bytes], pause: float) -> tuple[Answer, int]:
    sender = asyncio.create_task(trickle(client, pieces, pause))
    try:
        answer = await client.answer()
    finally:
        sender.cancel()
    sent = await sender if sender.done() and not sender.cancelled() else -1
    return answer, sent


async def test_a_header_that_never_ends_is_cut_off_long_before_it_fills_memory(port: int) -> None:
    """The parser buffers a header line until its end; the server stops that at a bound, across many reads."""
    client = await Client.connect(port)
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        yield b"GET /a HTTP/1.1\r\nX-Endless: "
        while sent < 10_000_000:
            sent += 1024
            yield b"v" * 1024

    try:
        answer, _ = await answer_while_sending(client, endless(), 0.001)
        assert answer.status == 431
        assert sent < 256 * 1024  # refused after a few kilobytes, not after megabytes
        assert await client.closed()
    finally:
        client.close()


async def test_a_small_body_is_read_and_ignored(port: int) -> None:
    client = await Client.connect(port)
    try:
        await client.send(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + GET)
        first, second = await client.answer(), await client.answer()
        assert (first.status, second.status) == (200, 200)
        await client.send(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + GET)
        assert [(await client.answer()).status for _ in range(2)] == [200, 200]
    finally:
        client.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_past_the_limit_gets_413(port: int, chunked: bool) -> None:
    size = LIMITS.max_body_bytes + 1
    if chunked:
        data = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % size + b"b" * size + b"\r\n0\r\n\r\n"
    else:
        data = b"POST /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    answer, closed = await one(port, data)
    assert answer.status == 413
    assert closed


async def test_slowloris_a_request_trickling_in_gets_408_at_the_request_timeout(port: int) -> None:
    client = await Client.connect(port)
    lines = itertools.chain([b"GET /a HTTP/1.1\r\n"], (b"X-%d: v\r\n" % i for i in range(1000)))
    try:
        started = time.monotonic()
        answer, _ = await answer_while_sending(client, lines, 0.05)  # a header line every 0.05 s, never the end
        elapsed = time.monotonic() - started
        assert answer.status == 408
        assert await client.closed()
        assert LIMITS.request_timeout <= elapsed < LIMITS.request_timeout + 1.0
    finally:
        client.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(port: int) -> None:
    client = await Client.connect(port)
    try:
        await client.send(GET)
        assert (await client.answer()).status == 200
        started = time.monotonic()
        assert await client.closed()
        elapsed = time.monotonic() - started
        assert LIMITS.idle_timeout - 0.1 <= elapsed < LIMITS.idle_timeout + 1.0
    finally:
        client.close()


async def test_a_connection_that_opens_and_sends_nothing_is_closed_after_the_idle_timeout(port: int) -> None:
    client = await Client.connect(port)
    try:
        assert await client.closed()
    finally:
        client.close()


async def test_a_handler_that_raises_gets_500_and_the_connection_stays_usable(port: int) -> None:
    client = await Client.connect(port)
    try:
        await client.send(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
        first, second = await client.answer(), await client.answer()
        assert first.status == 500
        assert "handler bug" not in first.body.decode()  # the log has it, the client gets a generic message
        assert second.status == 200
    finally:
        client.close()


async def test_reading_pauses_at_the_pipeline_bound_and_every_request_is_still_answered(port: int) -> None:
    client = await Client.connect(port)
    try:
        count = LIMITS.max_pipeline * 3
        await client.send(b"".join(b"GET /slow%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count)))
        paths = [(await client.answer()).headers["x-path"] for _ in range(count)]
        assert paths == [f"/slow{i}" for i in range(count)]
    finally:
        client.close()


async def _stop_answers_in_flight_then_closes(server: HttpServer, client: Client) -> None:
    await client.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0.02)
    stopping = asyncio.create_task(server.stop(grace=2.0))
    assert (await client.answer()).status == 201
    assert await client.closed()
    await asyncio.wait_for(stopping, DEADLINE)


async def test_stop_lets_an_answer_in_flight_go_out_then_closes() -> None:
    server = HttpServer(handler, LIMITS)
    port = await server.start("127.0.0.1:0")
    client = await Client.connect(port)
    try:
        await _stop_answers_in_flight_then_closes(server, client)
    finally:
        client.close()


async def test_stop_with_tls_ends_pending_handshakes_and_lets_an_answer_in_flight_go_out(tmp_path: Path) -> None:
    """Under TLS too: a client stuck before its handshake is closed, a request in flight is answered."""
    ca = CertificateAuthority(tmp_path)
    issued = ca.server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert_file, issued.key_file)
    server = HttpServer(handler, LIMITS, tls=lambda: context)
    port = await server.start("127.0.0.1:0")
    stuck = socket.create_connection(("127.0.0.1", port), timeout=5)  # never says hello
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl.create_default_context(cafile=ca.cert_file)
    )
    client = Client(reader, writer)
    try:
        await _stop_answers_in_flight_then_closes(server, client)
        assert await asyncio.to_thread(closed_within, stuck, 1.0) is not None
    finally:
        client.close()
        stuck.close()


def test_response_headers_with_line_breaks_are_refused_not_sent() -> None:
    with pytest.raises(ValueError, match="line break"):
        Response(200, (("x-org", "acme\r\nx-admin: 1"),)).encode()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_connections_past_the_cap_are_closed_as_they_arrive_and_the_others_are_served(
    tmp_path: Path, tls: bool
) -> None:
    """The listener holds at most ``max_connections`` (handshakes in progress count); a freed place is reused."""
    ca = CertificateAuthority(tmp_path)
    issued = ca.server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert_file, issued.key_file)
    client_context = ssl.create_default_context(cafile=ca.cert_file) if tls else None
    limits = Limits(max_connections=2, idle_timeout=5.0, request_timeout=5.0)
    server = HttpServer(handler, limits, tls=(lambda: context) if tls else None)
    port = await server.start("127.0.0.1:0")

    async def connect() -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
        return Client(reader, writer)

    async def served(client: Client) -> bool:
        await client.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        return (await client.answer()).status == 200

    first, second = await connect(), await connect()
    try:
        assert await served(first) and await served(second)
        if tls:  # the third TCP connection is closed before any handshake
            third_raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert await asyncio.to_thread(closed_within, third_raw, 2.0) is not None
            third_raw.close()
        else:
            third = await connect()
            assert await third.closed()
            third.close()
        assert await served(first)  # the others go on
        first.close()
        deadline = time.monotonic() + 5
        while len(server.connections) >= 2:
            assert time.monotonic() < deadline, "the closed connection still counts"
            await asyncio.sleep(0.02)
        fourth = await connect()
        assert await served(fourth)  # the place is free again
        fourth.close()
    finally:
        second.close()
        await server.stop(grace=0.5)
