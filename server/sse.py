"""Server-sent events for the streaming endpoints, at a few microseconds per chunk.

At hundreds of streams the HTTP process sends tens of thousands of chunks a second, so the
per-chunk path is kept short: each chunk is encoded once (orjson when installed, else the
standard json module) straight into its ``data: ...\\n\\n`` frame and handed to the ASGI server
as one body message; nothing else runs per chunk (no per-event objects, no middleware).
A comment line (``: ping``) goes out after ``ping_s`` seconds of silence (a request waiting in
the queue) so proxies keep the connection. A client that disconnects cancels the stream at
once, whether or not a chunk was due: its generator's ``finally`` aborts the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

try:  # orjson: ~10x faster than json.dumps on these small dicts; optional
    import orjson

    def encode_event(payload: Any) -> bytes:
        """One SSE frame of a JSON payload (a str payload such as "[DONE]" goes as is)."""
        if isinstance(payload, str):
            return b"data: " + payload.encode() + b"\n\n"
        return b"data: " + orjson.dumps(payload) + b"\n\n"
except ImportError:  # pragma: no cover - exercised where orjson is absent
    def encode_event(payload: Any) -> bytes:
        """One SSE frame of a JSON payload (a str payload such as "[DONE]" goes as is)."""
        if isinstance(payload, str):
            return b"data: " + payload.encode() + b"\n\n"
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_PING = b": ping\n\n"
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


class SSEResponse(Response):
    """A streaming response of pre-encoded SSE frames (a Starlette ``Response`` only so that
    route handlers may return it; it writes to the ASGI ``send`` itself).

    ``frames`` yields bytes (see ``encode_event``); the response ends when it does, or when the
    client disconnects (the frames iterator is then cancelled, so its cleanup runs at once).
    """

    def __init__(self, frames: AsyncIterator[bytes], ping_s: float = 15.0,
                 on_close: Callable[[], None] | None = None) -> None:
        self.frames, self.ping_s, self.on_close = frames, ping_s, on_close
        self.status_code, self.background, self.raw_headers = 200, None, list(_HEADERS)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            if self.on_close is not None:
                self.on_close()
        if streaming in done and not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()

    async def _stream(self, send: Any) -> None:
        # The frames go out as they come (no task, future or timer per frame: at 64-256 streams
        # those were a fifth of the HTTP process's time); a pinger task beside it sends a comment
        # line whenever ping_s passed without a frame. Each send is one whole frame, so a ping
        # can only fall between frames; it is stopped before the closing message.
        loop = asyncio.get_running_loop()
        self._last_sent = loop.time()
        pinger = asyncio.ensure_future(self._ping(send, loop))
        frames = self.frames.__aiter__()
        try:
            async for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                self._last_sent = loop.time()
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            await frames.aclose()

    async def _ping(self, send: Any, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            idle = loop.time() - self._last_sent
            if idle < self.ping_s:
                await asyncio.sleep(self.ping_s - idle)
                continue
            await send({"type": "http.response.body", "body": _PING, "more_body": True})
            self._last_sent = loop.time()


async def _wait_for_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
