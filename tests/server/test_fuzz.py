"""Property-based fuzzing of the OpenAI endpoints on the real SmolLM2 engine (in-process server).

Bodies are generated from the protocol's own pydantic fields (server/protocol.py): each field
gets a plausible value of its annotated type or a hostile one (wrong types, extreme integers
and floats, NaN, lone surrogates and other odd Unicode, huge and empty values), and sometimes
the whole body is not an object at all. Every answer must be a 200 or an OpenAI-shaped 4xx,
never a 5xx; afterwards /health is 200, a greedy request gives the answer it gave before, and
no request, batch slot or KV block is left taken.

CI runs a bounded number of examples on the CPU; for a longer run (or on a GPU):
    KILN_FUZZ_EXAMPLES=2000 [KILN_FUZZ_DEVICE=cuda] pytest tests/server/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import types
import typing
from typing import Any, Union

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kiln.runtime.config import EngineConfig
from kiln.server.app import create_app
from kiln.server.config import ServerConfig
from kiln.server.protocol import CHAT_ROLES, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, \
    TokenizeRequest

from .helpers import ThreadServer, metric

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "25"))
DEVICE = os.environ.get("KILN_FUZZ_DEVICE", "cpu")
MODEL = "smollm2"
GREEDY = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
          "max_tokens": 6, "temperature": 0}

EXTREME_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 49151, 49152]
EXTREME_FLOATS = [0.0, -0.0, 1e-45, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 2.000001]
ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "", "\x00", "\u202e\u2066", "\ufeff", "😀", "日本語",
                            "<|im_start|>", "<|im_end|>", "{{ 7 * 7 }}", "{% for x in range(99) %}x{% endfor %}",
                            "\n" * 40])
TEXT = st.one_of(st.text(max_size=12), ODD_TEXT)
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EXTREME_INTS), st.integers(), st.sampled_from(EXTREME_FLOATS),
    TEXT, st.lists(st.integers(-3, 60_000), max_size=5), st.just([]), st.just({}), st.just([[]]),
    st.dictionaries(TEXT, st.integers(), max_size=2), st.lists(TEXT, max_size=3), st.just("x" * 3000),
    st.just("y" * 40_000),  # past the body limit
)


def _plausible(annotation: Any, name: str = "") -> st.SearchStrategy:
    """A small, usually valid value of the annotated type (token ids, n, max_tokens stay tiny)."""
    if name == "role":
        return st.sampled_from(["user"] * 6 + list(CHAT_ROLES) + ["wizard", "", "\ud800"])
    if name == "model":
        return st.just(MODEL)
    if name == "type":  # a content part's
        return st.sampled_from(["text"] * 4 + ["image_url"])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _plausible(args[0], name)
    if origin in (Union, types.UnionType):
        return st.one_of(*(_plausible(a, name) for a in args if a is not type(None)))
    if origin is list:
        return st.lists(_plausible(args[0]), min_size=1, max_size=3)
    if origin is dict:
        return st.dictionaries(TEXT, _plausible(args[1]), max_size=2)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _body(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 4).flatmap(lambda i: st.sampled_from(EXTREME_INTS) if i == 0 else st.integers(0, 4))
    if annotation is float:
        return st.integers(0, 4).flatmap(lambda i: st.sampled_from(EXTREME_FLOATS) if i == 0 else st.floats(0, 1))
    if annotation is str:
        return st.integers(0, 2).flatmap(lambda i: ODD_TEXT if i == 0 else st.text(min_size=1, max_size=12))
    return HOSTILE


def _body(model: type[BaseModel]) -> st.SearchStrategy[dict]:
    """The model's required fields (and a message's content) and a few optional ones, each plausible."""
    fields = model.model_fields
    usual = {n for n, f in fields.items() if f.is_required() or n == "content"}
    required = st.fixed_dictionaries({n: _plausible(fields[n].annotation, n) for n in sorted(usual)})
    optional_names = sorted(set(fields) - usual)
    optional = st.lists(st.sampled_from(optional_names), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: _plausible(fields[n].annotation, n) for n in names}))
    return st.tuples(required, optional).map(lambda parts: {**parts[0], **parts[1]})


def _request_body(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """A plausible body with up to two fields made hostile; now and then no object at all."""
    mutations = st.one_of(st.just({}), st.dictionaries(st.sampled_from(sorted(model.model_fields)), HOSTILE,
                                                        min_size=1, max_size=2))
    body = st.tuples(_body(model), mutations).map(lambda parts: {**parts[0], **parts[1]})
    return st.integers(0, 19).flatmap(
        lambda i: HOSTILE if i == 0 else st.binary(max_size=20) if i == 1 else body)


ENDPOINTS = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
}
REQUESTS = st.sampled_from(list(ENDPOINTS)).flatmap(lambda path: st.tuples(st.just(path), _request_body(ENDPOINTS[path])))


@pytest.fixture(scope="module")
def live(smollm2_engine_dir):
    from kiln.runtime.engine import LLMEngine

    engine_config = EngineConfig(engine_dir=str(smollm2_engine_dir), device=DEVICE, max_model_len=64,
                                 num_kv_cache_tokens=1024, max_batch_size=4)
    config = ServerConfig(engine=engine_config, served_model_name=MODEL, max_queue=8, max_n=2, max_prompts=3,
                          max_request_bytes=32 * 1024)
    with ThreadServer(create_app(LLMEngine(engine_config), config)) as server:
        client = httpx.Client(base_url=server.base_url, timeout=120)
        reference = _greedy(client)
        yield client, reference
        client.close()


def _greedy(client: httpx.Client) -> str:
    r = client.post("/v1/chat/completions", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _send(client: httpx.Client, path: str, body: Any) -> tuple[int, bytes]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN and \ud800 included
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    return r.status_code, r.content


def _check_answer(status: int, raw: bytes, path: str) -> None:
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    if status != 200:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        return
    if raw.startswith(b"data:"):  # a stream: it ends cleanly and carries no error event
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any(b'"error"' in e.encode() for e in events[:-1]), events[-3:]
    elif path.startswith("/v1/"):
        assert json.loads(raw)["choices"]


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(request=REQUESTS)
def test_no_body_breaks_the_server_or_harms_the_next_request(live, request):
    client, reference = live
    path, body = request
    status, raw = _send(client, path, body)
    _check_answer(status, raw, path)
    assert client.get("/health").status_code == 200
    assert _greedy(client) == reference
    text = client.get("/metrics").text
    assert metric(text, "kiln:num_requests_running") == 0 and metric(text, "kiln:num_requests_waiting") == 0
    assert metric(text, "kiln:kv_cache_usage_perc") == 0.0
    assert metric(text, "kiln:num_batch_slots_used") <= 1  # the greedy request's, until the next step
