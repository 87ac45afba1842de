"""An image server that attacks the device: it lies about sizes or stalls.

It binds 127.0.0.1 on a port the kernel picks and serves whatever a test
puts at a path, in one of the ``Behaviour`` modes. Devices treat the image
URL as a transport only, so pointing an install command here is exactly
what a compromised or hostile server could do.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from enum import StrEnum

HOST = "127.0.0.1"


class Behaviour(StrEnum):
    HONEST = "honest"
    # Sends the body followed by extra bytes, with no Content-Length, so only
    # counting what arrives can catch it.
    EXTRA_BYTES = "extra_bytes"
    # Announces the full length, sends half the body and then nothing.
    STALL = "stall"


@dataclass
class Route:
    body: bytes
    behaviour: Behaviour
    extra: bytes = b""


@dataclass
class HostileImageServer:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _stalled: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)

    async def stop(self) -> None:
        for writer in self._stalled:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def serve(
        self, path: str, body: bytes, behaviour: Behaviour, extra: bytes = b""
    ) -> str:
        """Serve ``body`` at ``path`` and return its URL."""
        self.routes[path] = Route(body, behaviour, extra)
        return f"http://{HOST}:{self.port}{path}"

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request_line = (await reader.readline()).decode(errors="replace")
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        path = request_line.split(" ")[1] if " " in request_line else "/"
        self.requests.append(path)
        route = self.routes.get(path)
        if route is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        await self._respond(route, writer)

    async def _respond(self, route: Route, writer: asyncio.StreamWriter) -> None:
        body = route.body
        if route.behaviour is Behaviour.EXTRA_BYTES:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            writer.write(body + route.extra)
        elif route.behaviour is Behaviour.STALL:
            header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(header.encode() + body[: len(body) // 2])
            await writer.drain()
            # Keep the connection open without another byte until the test ends.
            self._stalled.append(writer)
            return
        else:
            header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(header.encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
