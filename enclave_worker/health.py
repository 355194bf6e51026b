"""Liveness and readiness over HTTP, for container health checks (compose, Kubernetes).

``GET /live`` answers 200 while the process serves at all; ``GET /ready`` answers 200 once the
worker has joined its pool with a key and consumes jobs, 503 before that and while it drains.
Anyone who can reach the port can send bytes here, so the server reads at most one short request
line within a few seconds, serves a few connections at once, and says nothing but those states.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

MAX_REQUEST_LINE = 1024  # bytes: "GET /ready HTTP/1.1" and then some
READ_SECONDS = 5.0
MAX_CONNECTIONS = 16


class HealthServer:
    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, port: int, addr: str = "127.0.0.1") -> int:
        """Listen on ``addr:port`` (0: any free port); the port listened on."""
        self._server = await asyncio.start_server(self._serve, addr, port, limit=MAX_REQUEST_LINE)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def status(self, path: str) -> tuple[int, str]:
        if path == "/live":
            return 200, "live"
        if path == "/ready":
            return (200, "ready") if self._ready() else (503, "not ready")
        return 404, "not found: /live or /ready"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                line = await asyncio.wait_for(reader.readline(), READ_SECONDS)
            except (TimeoutError, ValueError, ConnectionError):  # slow, over-long or gone
                return
            parts = line.decode("ascii", "replace").split()
            code, text = self.status(parts[1]) if len(parts) >= 2 and parts[0] in ("GET", "HEAD") else (405, "GET only")
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[code]
            body = b"" if parts[:1] == ["HEAD"] else f"{text}\n".encode()
            writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
