"""A raw HTTP/1.1 client for tests: exact bytes out, parsed answers in, every read under a deadline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

DEADLINE = 5.0  # seconds any one read may take before the test fails


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """A raw TCP client: bytes out, parsed answers in, and whether the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head: bool = False) -> Answer:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        body = await asyncio.wait_for(self.reader.readexactly(length), DEADLINE)
        return Answer(status, headers, body)

    async def closed(self) -> bool:
        """True once the server has closed the connection (EOF), within the deadline."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), DEADLINE)
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


async def one(port: int, data: bytes) -> tuple[Answer, bool]:
    """Send ``data`` on a fresh connection: the first answer, and whether the server then closed."""
    client = await Client.connect(port)
    try:
        await client.send(data)
        answer = await client.answer()
        return answer, await client.closed()
    finally:
        client.close()


async def ask(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    """One request on a fresh connection, and its answer."""
    client = await Client.connect(port)
    try:
        await client.send(request_bytes(method, path, headers))
        return await client.answer(head=method == "HEAD")
    finally:
        client.close()


def request_bytes(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: authz", "content-length: 0"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
