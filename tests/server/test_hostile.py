"""Hostile input against the real SmolLM2 engine: what one client sends cannot hurt another.

One in-process server (uvicorn in a thread, the real LLMEngine on the CPU) with small limits:
max_batch_size 4, --max-queue 8, --max-n 4, --max-prompts 4, a 64 KiB body limit. The
reference for "nothing was hurt" is the same greedy request answered before the attack.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from kiln.runtime.config import EngineConfig
from kiln.server.app import create_app
from kiln.server.config import ServerConfig

from .helpers import ThreadServer, assert_error, metric, sse_events

pytestmark = pytest.mark.slow

MODEL = "smollm2"
VOCAB = 49152
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
BODY_LIMIT = 64 * 1024


class Live:
    def __init__(self, app, base_url: str) -> None:
        self.app, self.url = app, base_url
        self.reference = self.greedy()

    def post(self, path: str, body: dict | str, **kw) -> httpx.Response:
        if isinstance(body, str):  # raw JSON text (escapes json.dumps would not write)
            return httpx.post(self.url + path, content=body, headers={"content-type": "application/json"},
                              timeout=120, **kw)
        return httpx.post(self.url + path, json=body, timeout=120, **kw)

    def greedy(self) -> str:
        r = self.post("/v1/chat/completions", GREEDY)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def assert_unharmed(self) -> None:
        """Healthy, the greedy answer unchanged, and no batch slot or KV block left taken."""
        assert httpx.get(self.url + "/health").status_code == 200
        assert self.greedy() == self.reference
        text = httpx.get(self.url + "/metrics").text
        assert metric(text, "kiln:num_requests_running") == 0 and metric(text, "kiln:num_requests_waiting") == 0
        assert metric(text, "kiln:kv_cache_usage_perc") == 0.0
        # The request that just finished keeps its slot until the next step; nothing else may.
        assert metric(text, "kiln:num_batch_slots_used") <= 1


@pytest.fixture(scope="module")
def live(smollm2_engine_dir):
    from kiln.runtime.engine import LLMEngine

    engine_config = EngineConfig(engine_dir=str(smollm2_engine_dir), device="cpu", max_model_len=256,
                                 num_kv_cache_tokens=2048, max_batch_size=4)
    config = ServerConfig(engine=engine_config, served_model_name=MODEL, max_queue=8, max_n=4, max_prompts=4,
                          max_request_bytes=BODY_LIMIT)
    app = create_app(LLMEngine(engine_config), config)
    with ThreadServer(app) as server:
        yield Live(app, server.base_url)


# ---------------------------------------------------------------- bug 1: one field took the server down

def test_huge_top_k_is_served_and_leaks_no_batch_slot(live):
    # top_k >= 2**31 overflowed the sampler after the request had taken a batch slot, which
    # only the runner's own error type released: 500, and 4 such requests filled the batch.
    bad = {**GREEDY, "top_k": 1099511627776, "temperature": 0.7, "max_tokens": 1}
    for _ in range(6):  # more than max_batch_size
        r = live.post("/v1/chat/completions", bad)
        assert r.status_code == 200, r.text
    assert_error(live.post("/v1/chat/completions", {**bad, "top_k": 2**63}), 400, "top_k")
    live.assert_unharmed()


# ---------------------------------------------------------------- bug 2: one bad request cut other streams

def test_a_bad_request_does_not_cut_a_neighbours_stream(live):
    innocent = {"model": MODEL, "messages": QUESTION, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    expected = live.post("/v1/chat/completions", innocent).json()["choices"][0]["message"]["content"]
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json={**innocent, "stream": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(sse_events(lines)) >= 4:
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(60)
        bad_seeds = [({"seed": 2**64}, 400), ({"seed": -2**63 - 1}, 400), ({"seed": 2**63 - 1, "n": 2}, 400)]
        for change, status in bad_seeds:
            assert_error(live.post("/v1/chat/completions", {**GREEDY, "temperature": 0.7, **change}), status, "seed")
        r = live.post("/v1/chat/completions", {**GREEDY, "temperature": 0.7, "top_k": 2**40, "seed": 2**63 - 1})
        assert r.status_code == 200, r.text
    finally:
        reader.join(120)
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == expected
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"


# ---------------------------------------------------------------- bug 3: lone surrogates

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi \\ud800"}],"max_tokens":1}',
     "messages[0].content"),
    ("/v1/chat/completions",
     '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}],"max_tokens":1}',
     "messages[0].content[0].text"),
    ("/v1/completions", '{"prompt":"\\ud800","max_tokens":1}', "prompt"),
    ("/v1/completions", '{"prompt":["fine","x\\ud800"],"max_tokens":1}', "prompt[1]"),
    ("/tokenize", '{"prompt":"a\\ud800"}', "prompt"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"stop":["\\udc00"]}', "stop[0]"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(live, path, body, param):
    with httpx.Client(base_url=live.url, timeout=120) as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        err = assert_error(r, 400, param)
        assert "surrogate" in err["message"]
        port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
        again = client.post("/v1/chat/completions", json=GREEDY)  # same keep-alive connection
        assert again.status_code == 200
        assert again.extensions["network_stream"].get_extra_info("client_addr")[1] == port


def test_a_surrogate_pair_is_ordinary_text(live):
    r = live.post("/tokenize", '{"prompt":"smile \\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["count"] > 1


# ---------------------------------------------------------------- limits: queue counts sequences, n, body size

def test_what_can_never_fit_is_a_400(live):
    assert_error(live.post("/v1/chat/completions", {**GREEDY, "n": 5}), 400, "n")  # --max-n 4
    assert_error(live.post("/v1/completions", {"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 1}), 400, "prompt")
    # 3 prompts x n 3 = 9 sequences: more than --max-queue 8 could ever hold.
    err = assert_error(live.post("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3,
                                               "max_tokens": 1}), 400, "n")
    assert "8" in err["message"]
    r = live.post("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 4, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_a_body_over_the_limit_is_413_without_being_read(live):
    big = {"model": MODEL, "prompt": "x" * BODY_LIMIT, "max_tokens": 1}
    err = assert_error(live.post("/v1/completions", big), 413)
    assert str(BODY_LIMIT) in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(live.url + "/v1/completions", content=chunks(), timeout=120,
                   headers={"content-type": "application/json"})
    assert_error(r, 413)
    live.assert_unharmed()


def test_a_prompt_its_length_proves_too_long_is_refused_before_tokenizing(live):
    text = "hello " * 10_000  # 60 KB: more bytes than 256 tokens of this vocabulary can cover
    for path, body, param in [
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}, "messages"),
    ]:
        err = assert_error(live.post(path, body), 400, param)
        assert "at least" in err["message"] and "256" in err["message"]


def test_a_long_tokenization_does_not_hold_up_short_requests(live):
    lanes = live.app.state.ctx.tokenizers
    gate = threading.Event()
    lanes.long.pool.submit(gate.wait, 60)  # the long-prompt lane is busy until the gate opens
    results: dict[str, httpx.Response] = {}
    long_body = {"model": MODEL, "prompt": "word " * 4000, "max_tokens": 1}  # 20 KB, under the proof bound

    def send_long() -> None:
        results["long"] = live.post("/v1/completions", long_body)

    sender = threading.Thread(target=send_long)
    sender.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        assert live.greedy() == live.reference  # served while the long one waits for its lane
        assert time.monotonic() - start < 30 and "long" not in results
    finally:
        gate.set()
        sender.join(120)
    assert_error(results["long"], 400, "prompt")  # 4,000 tokens > max_model_len 256, found by tokenizing


# ---------------------------------------------------------------- values OpenAI rejects

@pytest.mark.parametrize("change, param", [
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 3.0}, "max_tokens"),
    ({"seed": "42"}, "seed"),
    ({"n": "2"}, "n"),
    ({"temperature": True}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": 1}, "logprobs"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 2**64}, "min_tokens"),
    ({"top_logprobs": 2**64, "logprobs": True}, "top_logprobs"),
])
def test_values_openai_rejects_are_400_naming_the_param(live, change, param):
    assert_error(live.post("/v1/chat/completions", {**GREEDY, **change}), 400, param)


def test_an_assistant_turn_may_omit_content_only_with_tool_calls(live):
    ok = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]}
    messages = [{"role": "user", "content": "hi"}, ok, {"role": "user", "content": "and?"}]
    assert live.post("/v1/chat/completions", {**GREEDY, "messages": messages}).status_code == 200
    messages[1] = {"role": "assistant"}
    assert_error(live.post("/v1/chat/completions", {**GREEDY, "messages": messages}), 400, "messages[1].content")


@pytest.mark.parametrize("change, param", [
    ({"prompt": [1, True]}, "prompt"), ({"prompt": [[VOCAB]]}, "prompt"), ({"logprobs": True}, "logprobs"),
    ({"best_of": "1"}, "best_of"), ({"echo": 1}, "echo"),
])
def test_completions_type_confusion_is_400(live, change, param):
    assert_error(live.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, **change}), 400, param)


# ---------------------------------------------------------------- request ids

def test_every_response_carries_a_request_id_and_echoes_the_clients(live):
    responses = [
        httpx.get(live.url + "/health"), httpx.get(live.url + "/metrics"), httpx.get(live.url + "/nowhere"),
        live.post("/v1/chat/completions", {**GREEDY, "n": 0}),
        live.post("/v1/completions", {"model": MODEL, "prompt": "x" * BODY_LIMIT}),
        live.post("/v1/chat/completions", GREEDY),
    ]
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**GREEDY, "stream": True}, timeout=60) as r:
        r.read()
        responses.append(r)
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids), ids
    r = httpx.get(live.url + "/health", headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    r = live.post("/v1/chat/completions", {**GREEDY, "n": 0}, headers={"X-Request-Id": "trace-43"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-43"


def test_the_server_is_unharmed_after_everything(live):
    live.assert_unharmed()
    assert json.loads(httpx.get(live.url + "/v1/models").text)["data"][0]["id"] == MODEL
