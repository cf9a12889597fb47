"""What chat, agent and code-completion apps send, through `serve-llm` on the real SmolLM2 engine
(its own engine process) with the real clients: the `openai` SDK (structured output parsed into a
pydantic model, tool calls over two turns, streamed tool calls), `langchain-openai` (structured output,
bound tools), logit_bias, echo + logprobs and prompt_logprobs. References: jsonschema, the offline ``kiln.runtime.LLM`` on the same engine.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from kiln.scheduler.sampling_params import SamplingParams

from .helpers import assert_error, start_serve_llm

pytestmark = pytest.mark.slow

MODEL = "smollm2"
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "512", "--num-kv-cache-tokens", "8192"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}}, "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(BaseModel):
    name: str = Field(max_length=20)  # bounded strings: the tiny model may not close a string soon
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=10**9)


@pytest.fixture(scope="module")
def server(smollm2_engine_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("apps") / "server.log"
    proc, url = start_serve_llm(smollm2_engine_dir, log, "--served-model-name", MODEL, *ENGINE_FLAGS)
    yield url
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def offline(smollm2_engine_dir):
    from kiln.runtime import LLM

    with LLM(smollm2_engine_dir, device="cpu", max_model_len=512, num_kv_cache_tokens=8192) as llm:
        yield llm


def test_openai_parse_returns_a_validated_model(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris as JSON."}],
                       response_format=City, max_tokens=60, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    jsonschema.validate(json.loads(choice.message.content), City.model_json_schema())


def test_schema_cut_off_is_length_and_guided_extras(client, server):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    r = client.completions.create(model=MODEL, prompt="A story:", max_tokens=5, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "s", "schema": schema}}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.startswith('{"story": "')
    choice = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=8, temperature=1.0,
                                            seed=3, extra_body={"guided_choice": ["sunny", "rainy"]})
    assert choice.choices[0].message.content in ("sunny", "rainy")
    regex = client.completions.create(model=MODEL, prompt="Phone:", max_tokens=12, temperature=1.0, seed=4,
                                      extra_body={"guided_regex": r"\+33 [0-9]{3}"})
    assert re.fullmatch(r"\+33 [0-9]{3}", regex.choices[0].text)
    r = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK_WEATHER, "guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}})
    assert_error(r, 400, "guided_json")


def _tool_request(**kw):
    return dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
                parallel_tool_calls=False, **kw)


def test_tool_calls_round_trip_over_two_turns(client, server):
    first = client.chat.completions.create(**_tool_request(tool_choice="required"))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    history = ASK_WEATHER + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=8, tool_choice="none")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    # The template (SmolLM2's ignores tools) got the tools, the call and its result as text.
    rendered = httpx.post(server + "/tokenize", json={"model": MODEL, "messages": history}).json()["tokens"]
    text = httpx.post(server + "/detokenize", json={"model": MODEL, "tokens": rendered}).json()["prompt"]
    assert '<tool_call>\n{"name": "' + call.function.name + '"' in text and "<tool_response>" in text


def test_named_tool_choice_and_streamed_deltas_assemble_into_the_same_calls(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(**_tool_request(tool_choice=named))
    assert [c.function.name for c in whole.choices[0].message.tool_calls] == ["get_time"]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**_tool_request(tool_choice=named), stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == whole.choices[0].finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_logit_bias_forces_and_bans_tokens(client, offline):
    prompt = "The capital of France is"
    ref = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, logprobs=2), use_tqdm=False)[0]
    best, second = [t for t, _ in ref.outputs[0].logprobs[0].top]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(best): -100}, logprobs=0)
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.7, seed=1,
                                       logit_bias={"28": 100})
    assert banned.choices[0].logprobs.token_logprobs[0] == pytest.approx(ref.outputs[0].logprobs[0].top[1][1], abs=1e-4)
    tok = offline.get_tokenizer()
    assert banned.choices[0].text == tok.decode([second])
    assert forced.choices[0].text == tok.decode([28, 28, 28])


def test_echo_logprobs_and_prompt_logprobs_equal_offline(client, server, offline):
    tok = offline.get_tokenizer()
    ids = tok.encode("Paris is the capital and largest city of France.")
    ref = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0].prompt_logprobs
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(tok.decode(ids))
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-4)
    assert [max(t.values()) for t in lp.top_logprobs[1:len(ids)]] == pytest.approx(
        [e.top[0][1] for e in ref[1:]], abs=1e-4)
    chat = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": ASK_WEATHER, "max_tokens": 1, "prompt_logprobs": 2}).json()
    entries = chat["prompt_logprobs"]
    assert entries[0] is None and all(len(e) in (2, 3) for e in entries[1:])
    streamed = [json.loads(line[6:]) for line in httpx.post(server + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": ids, "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True,
    }).text.splitlines() if line.startswith("data: {")]
    assert streamed[0]["choices"][0]["text"] == tok.decode(ids)
    assert streamed[0]["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:len(ids)],
                                                                                        abs=1e-4)


def test_suffix_needs_fim_tokens(server):
    r = httpx.post(server + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "def f(x):", "suffix": "    return y", "max_tokens": 4})
    assert "FIM tokens" in assert_error(r, 400, "suffix")["message"]


def test_langchain_structured_output_and_bound_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server + "/v1", api_key="none", temperature=0, max_tokens=60,
                      max_retries=0)
    city = llm.with_structured_output(City, method="json_schema").invoke("Tell me about Paris as JSON.")
    assert isinstance(city, City)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
