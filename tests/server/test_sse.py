"""SSEResponse at the ASGI level: frames in order then the end, pings only during silence and
never after the end, and a disconnect cancelling the frames at once (their cleanup runs)."""

from __future__ import annotations

import asyncio

from kiln.server.sse import SSEResponse, encode_event


class _Client:
    """An ASGI receive/send pair that records the body messages; ``disconnect`` ends receive."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def _run(response: SSEResponse, client: _Client, during=None) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))
        if during is not None:
            await during()
        await task

    asyncio.run(main())


def test_frames_go_out_in_order_then_the_end():
    async def frames():
        for i in range(3):
            yield encode_event({"i": i})
        yield encode_event("[DONE]")

    client = _Client()
    _run(SSEResponse(frames(), ping_s=30.0), client)
    assert client.sent[0]["type"] == "http.response.start"
    assert client.bodies() == [b'data: {"i":0}\n\n', b'data: {"i":1}\n\n', b'data: {"i":2}\n\n', b"data: [DONE]\n\n", b""]
    assert client.sent[-1]["more_body"] is False and all(m["more_body"] for m in client.sent[1:-1])


def test_pings_fill_silences_only_and_stop_at_the_end():
    async def frames():
        await asyncio.sleep(0.35)  # queued: the client hears pings meanwhile
        yield encode_event({"first": True})
        yield encode_event({"second": True})  # no silence here: no ping in between

    client = _Client()
    _run(SSEResponse(frames(), ping_s=0.1), client, during=None)
    bodies = client.bodies()
    first = bodies.index(b'data: {"first":true}\n\n')
    assert 2 <= first <= 4 and set(bodies[:first]) == {b": ping\n\n"}
    assert bodies[first + 1:] == [b'data: {"second":true}\n\n', b""]


def test_a_disconnect_cancels_the_frames_and_runs_their_cleanup():
    cleaned = []

    async def frames():
        try:
            yield encode_event({"i": 0})
            await asyncio.sleep(60)  # waiting on the engine
            yield encode_event({"i": 1})
        finally:
            cleaned.append(True)

    client = _Client()
    closed = []

    async def disconnect_soon():
        await asyncio.sleep(0.1)
        client.gone.set()

    _run(SSEResponse(frames(), ping_s=30.0, on_close=lambda: closed.append(True)), client, during=disconnect_soon)
    assert cleaned == [True] and closed == [True]
    assert client.bodies() == [b'data: {"i":0}\n\n']  # no end message after a disconnect
