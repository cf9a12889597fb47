"""RequestGuard: the pure ASGI middleware every HTTP request passes first.

- Every response carries ``x-request-id``: the client's own when it sent a sane one (up to
  128 visible ASCII characters), else a fresh one.
- A body larger than ``max_body_bytes`` gets a 413 before it is read: at once from its
  Content-Length, or as soon as a chunked body grows past the limit (the connection is then
  closed, as the rest of the body is never read).
- An unexpected exception becomes a 500 in OpenAI's shape *without* ending the connection
  (Starlette's own error middleware re-raises, which makes uvicorn drop a keep-alive
  connection and the client's next request on it fail). Once a response has started it can
  only be cut, so the exception goes on to uvicorn.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any, Awaitable, Callable

from kiln.server.errors import error_body, internal_error

logger = logging.getLogger(__name__)

_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class RequestGuard:
    """See the module docstring. Invariant: it sends at most one response per request."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"")
        if not _CLIENT_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex.encode()
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        limit = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(send_with_id, limit)
            return
        if length is None and b"transfer-encoding" in headers:  # chunked: count it as it comes
            buffered = await _read_body(receive, limit)
            if buffered is None:
                await _too_large(send_with_id, limit)
                return
            receive = _replay(buffered, receive)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                raise
            logger.exception("Unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await _send_json(send_with_id, 500, internal_error().body())


async def _read_body(receive: Receive, limit: int) -> list[dict] | None:
    """The body's messages, or None once more than ``limit`` bytes arrived."""
    messages: list[dict] = []
    total = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        total += len(message.get("body", b""))
        if total > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[dict], receive: Receive) -> Receive:
    """A receive that gives ``messages`` first, then whatever comes (a later disconnect)."""
    pending = list(messages)

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _too_large(send: Send, limit: int) -> None:
    body = error_body(413, f"The request body is larger than this server's limit of {limit} bytes "
                           "(--max-request-bytes).")
    await _send_json(send, 413, body, close=True)


async def _send_json(send: Send, status: int, body: dict, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
