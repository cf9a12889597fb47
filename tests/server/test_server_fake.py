"""Server behaviour over FakeEngine (tests/server/fake_engine.py): exact SSE framing, error
shapes, and the failure paths a real model cannot be made to hit on demand."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from kiln.runtime.config import EngineConfig
from kiln.scheduler.sampling_params import SamplingParams
from kiln.server.app import create_app
from kiln.server.async_engine import AsyncEngine, EngineDeadError, EngineRequest, EngineStepError
from kiln.server.config import ServerConfig
from kiln.server.metrics import ServerMetrics

from .fake_engine import FakeEngine, expected_text
from .helpers import ThreadServer, assert_error, metric, sse_events

MODEL = "fake"


def _server(engine: FakeEngine, **options) -> ThreadServer:
    config = ServerConfig(engine=EngineConfig(engine_dir="fake"), served_model_name=MODEL, **options)
    return ThreadServer(create_app(engine, config))


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(max_model_len=64)
    with _server(engine) as server:
        yield engine, server.base_url


def _stream(base_url: str, path: str, body: dict) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", base_url + path, json=body, timeout=30) as r:
        return r, r.read().decode()


def test_chat_stream_framing_n2_with_usage(fake):
    engine, url = fake
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}
    r, raw = _stream(url, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n") and "\r" not in raw
    events = sse_events(raw.split("\n"))
    chunks, done = events[:-1], events[-1]
    assert done == "[DONE]"
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    prompt = list(b"<user>hi<assistant>")
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == expected_text(prompt, 3)
        # One chunk per token unless the stream fell behind the engine (then tokens merge).
        reasons = [ch["finish_reason"] for ch in mine]
        assert 2 <= len(reasons) <= 4 and reasons == [None] * (len(reasons) - 1) + ["length"]
        assert mine[-1]["delta"] == {}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}


def test_completions_several_prompts_and_logprobs(fake):
    _, url = fake
    body = {"model": MODEL, "prompt": ["ab", [65, 66, 67]], "n": 2, "max_tokens": 2, "logprobs": 1}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in out["choices"]]
    assert texts == [expected_text(list(b"ab"), 2)] * 2 + [expected_text([65, 66, 67], 2)] * 2
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == list(texts[0]) and lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["text_offset"] == [0, 1] and len(lp["top_logprobs"][0]) == 1
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("change, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": "hello"}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"max_tokens": 60}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
])
def test_chat_bad_fields_are_400_naming_the_param(fake, change, param):
    r = httpx.post(fake[1] + "/v1/chat/completions", json={**CHAT, **change}, timeout=30)
    assert_error(r, 400, param)


@pytest.mark.parametrize("change, param", [
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
    ({"prompt": [[]]}, "prompt"), ({"prompt": [1, 999]}, "prompt"),
])
def test_completions_unsupported_fields_are_400(fake, change, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **change}
    assert_error(httpx.post(fake[1] + "/v1/completions", json=body, timeout=30), 400, param)


def test_engine_rejection_names_the_prompt_param(fake):
    # The engine's own rejections carry no param; the server names the prompt field.
    body = {"model": MODEL, "prompt": "", "max_tokens": 2}
    err = assert_error(httpx.post(fake[1] + "/v1/completions", json=body, timeout=30), 400, "prompt")
    assert "empty" in err["message"]


def test_context_limit_message_names_the_limit(fake):
    r = httpx.post(fake[1] + "/v1/chat/completions", json={**CHAT, "max_tokens": 60}, timeout=30)
    assert "64" in assert_error(r, 400)["message"]


def test_malformed_json_unknown_model_route_and_extra_fields(fake):
    url = fake[1]
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_error(httpx.post(url + "/v1/chat/completions", json={**CHAT, "model": "nope"}, timeout=30), 404, "model")
    assert_error(httpx.get(url + "/v1/nothing", timeout=30), 404)
    r = httpx.post(url + "/v1/chat/completions", json={**CHAT, "some_future_field": 1, "temperature": None},
                   timeout=30)
    assert r.status_code == 200, r.text


def test_failed_request_is_500_without_internals_and_server_lives(fake):
    url = fake[1]
    bad = {**CHAT, "messages": [{"role": "user", "content": "FAIL_REQUEST"}]}
    err = assert_error(httpx.post(url + "/v1/chat/completions", json=bad, timeout=30), 500)
    assert "Traceback" not in err["message"] and "fake" not in err["message"].lower()
    r, raw = _stream(url, "/v1/chat/completions", {**bad, "stream": True})
    events = sse_events(raw.split("\n"))
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "internal_server_error"
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_step_exception_fails_in_flight_requests_only(fake):
    engine, url = fake
    engine.step_delay = 0.05

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40}))
                     for _ in range(2)]
            await asyncio.sleep(0.3)
            engine.raise_next_step = True
            return [(await t).status_code for t in tasks]

    try:
        assert asyncio.run(run()) == [500, 500]
    finally:
        engine.step_delay = 0.0
    assert not engine.running
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_disconnect_aborts_the_request(fake):
    engine, url = fake
    engine.step_delay = 0.02
    aborted_before = len(engine.aborted)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={**CHAT, "max_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.running and len(engine.aborted) == aborted_before + 1
    finally:
        engine.step_delay = 0.0
    metrics = httpx.get(url + "/metrics").text
    assert metric(metrics, "kiln:request_success_total", finished_reason="abort") >= 1


def test_non_streaming_client_gone_aborts_the_request(fake):
    engine, url = fake
    engine.step_delay = 0.02
    aborted_before = len(engine.aborted)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 40}, timeout=0.3)
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.running and len(engine.aborted) == aborted_before + 1
    finally:
        engine.step_delay = 0.0


def test_full_queue_is_503_with_retry_after_counting_sequences():
    # n choices wait as n sequences: a request with n=3 fills three of --max-queue 4 places.
    engine = FakeEngine(step_delay=0.05, max_running=1)
    with _server(engine, max_queue=4) as server:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                body = {**CHAT, "max_tokens": 20}
                first = asyncio.create_task(client.post("/v1/chat/completions", json=body))
                await asyncio.sleep(0.2)
                second = asyncio.create_task(client.post("/v1/chat/completions", json={**body, "n": 3}))
                await asyncio.sleep(0.2)  # second waits behind first: 3 sequences of 4 places
                third = await client.post("/v1/chat/completions", json={**body, "n": 2})
                fourth = await client.post("/v1/chat/completions", json={**body, "max_tokens": 1})
                return [await first, await second, third, fourth]

        first, second, third, fourth = asyncio.run(run())
    assert first.status_code == 200 and second.status_code == 200 and fourth.status_code == 200
    assert "4 sequences" in assert_error(third, 503)["message"]
    assert third.headers["retry-after"] == "1"


def test_dead_engine_loop_reports_unhealthy():
    engine = FakeEngine()
    with _server(engine) as server:
        engine.die_next_step = True
        r = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code in (500, 503)
        assert httpx.get(server.base_url + "/health").status_code == 503
        assert_error(httpx.post(server.base_url + "/v1/chat/completions", json=CHAT, timeout=30), 503)


def _engine_request(rid: str, max_tokens: int = 50) -> EngineRequest:
    return EngineRequest(rid, "hi", SamplingParams(max_tokens=max_tokens), time.monotonic())


def test_request_queued_while_the_loop_dies_gets_anassert_error():
    # A submission that reaches the inbox during the step that kills the loop must not wait forever.
    engine = FakeEngine(step_delay=0.5)
    async_engine = AsyncEngine(engine)

    async def run() -> None:
        async_engine.start()
        await async_engine.generate([_engine_request("a")])
        await asyncio.sleep(0.1)  # the engine thread is inside its 0.5 s step now
        engine.die_next_step = True
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(async_engine.generate([_engine_request("b")]), 5)
        with pytest.raises(EngineDeadError):  # and nothing is accepted afterwards
            await async_engine.generate([_engine_request("c")])

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert async_engine.num_waiting == 0


def test_failed_step_leaves_no_per_request_metrics_state():
    engine = FakeEngine(step_delay=0.02)
    async_engine = AsyncEngine(engine)
    metrics = ServerMetrics(lambda: async_engine.stats, MODEL)
    async_engine.metrics = metrics

    async def run() -> None:
        async_engine.start()
        stream = await async_engine.generate([_engine_request("a")])
        with pytest.raises(EngineStepError):
            async for out in stream:
                assert metrics._last_token_time  # the request produced a token
                engine.raise_next_step = True

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert metrics._last_token_time == {}
