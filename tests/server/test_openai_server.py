"""`serve-llm` on the real SmolLM2 engine, driven by the `openai` client and raw httpx.

One server per module (a subprocess, auth on). Reference: the offline ``kiln.runtime.LLM`` on
the same engine directory with the same settings, in this test process.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from kiln.scheduler.sampling_params import SamplingParams

from .helpers import metric, sse_events, start_serve_llm

pytestmark = pytest.mark.slow

KEY = "sk-test-123"
MODEL = "smollm2"
# Small context and KV pool: lean on 2 CPU cores, and the context limit is cheap to hit.
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "512", "--num-kv-cache-tokens", "8192"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_engine_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_serve_llm(smollm2_engine_dir, log, "--api-key", KEY, "--served-model-name", MODEL,
                                *ENGINE_FLAGS)
    yield url
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def offline(smollm2_engine_dir):
    from kiln.runtime import LLM

    return LLM(smollm2_engine_dir, device="cpu", max_model_len=512, num_kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_models_and_version(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server + "/version").json()["version"]


def test_auth_missing_bad_good_and_open_routes(server):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(server + "/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.post(server + "/v1/chat/completions", json=body, headers=_auth(), timeout=60).status_code == 200
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/metrics").status_code == 200


def test_chat_greedy_and_seeded_equal_offline(client, offline):
    for settings in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 1234}):
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, **settings)
        ref = offline.chat(QUESTION, SamplingParams(max_tokens=12, **settings), use_tqdm=False)[0]
        assert r.choices[0].message.content == ref.outputs[0].text
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_prompt_forms_equal_offline(client, offline):
    tok = offline.get_tokenizer()
    prompts = ["The quick brown fox", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    refs = offline.generate(prompts, params, use_tqdm=False)
    expected = [r.outputs[0].text for r in refs]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    ids = [tok.encode(p) for p in prompts]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 12


def test_stop_strings_and_logprobs_equal_offline(client, offline):
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=["Paris"], logprobs=2)
    ref = offline.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                       stop=["Paris"], logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.content == ref.text and "Paris" not in ref.text
    assert choice.finish_reason == "stop" == ref.finish_reason
    got = choice.logprobs.content
    assert len(got) == len(ref.logprobs)
    # logprobs cover every generated token, the stop string's too (the text drops it)
    generated = offline.get_tokenizer().decode(ref.token_ids)
    assert generated.startswith(ref.text) and generated != ref.text
    assert "".join(e.token for e in got) == generated
    assert b"".join(bytes(e.bytes) for e in got).decode() == generated
    for entry, lp in zip(got, ref.logprobs):
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([x for _, x in lp.top], abs=1e-4)


def test_streaming_n2_interleaves_and_equals_offline(client, offline):
    settings = {"temperature": 1.0, "seed": 7}
    ref = offline.chat(QUESTION, SamplingParams(n=2, max_tokens=8, **settings), use_tqdm=False)[0]
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=2, stream=True,
                                            stream_options={"include_usage": True}, **settings)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert order[:4] in ([0, 1, 0, 1], [1, 0, 1, 0]), order  # both choices advance step by step
    for out in ref.outputs:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == out.index)
        assert text == out.text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)


def test_32_concurrent_streams_equal_their_non_streaming_result(server, offline):
    questions = [f"Name a colour and a number above {i}." for i in range(32)]
    non_streaming = httpx.post(server + "/v1/completions", headers=_auth(), timeout=300, json={
        "model": MODEL, "prompt": questions, "max_tokens": 6, "temperature": 0}).json()
    expected = [c["text"] for c in sorted(non_streaming["choices"], key=lambda c: c["index"])]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(prompt: str) -> tuple[str, str]:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                  stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run() -> list:
        try:
            return await asyncio.gather(*(one(q) for q in questions))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert [t for t, _ in results] == expected
    assert all(reason in ("stop", "length") for _, reason in results)


def test_tokenize_round_trip(server, offline):
    text = "Kiln serves LLMs."
    r = httpx.post(server + "/tokenize", json={"model": MODEL, "prompt": text}, headers=_auth()).json()
    assert r["tokens"] == offline.get_tokenizer().encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    back = httpx.post(server + "/detokenize", json={"tokens": r["tokens"]}, headers=_auth()).json()
    assert back["prompt"].endswith(text)
    chat = httpx.post(server + "/tokenize", json={"messages": QUESTION}, headers=_auth()).json()
    assert chat["count"] > len(offline.get_tokenizer().encode(QUESTION[0]["content"]))


def test_errors_on_the_real_engine(server):
    def post(body: dict) -> httpx.Response:
        return httpx.post(server + "/v1/chat/completions", json=body, headers=_auth(), timeout=60)

    r = post({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4})
    assert r.status_code == 400 and "512" in r.json()["error"]["message"]
    r = post({"model": MODEL, "messages": QUESTION, "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert post({"model": "gpt-4", "messages": QUESTION}).status_code == 404
    r = post({"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_disconnect_aborts_and_frees_the_request(server):
    metrics = lambda: httpx.get(server + "/metrics").text  # noqa: E731
    aborts_before = metric(metrics(), "kiln:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = r.iter_lines()
        events = [next(lines) for _ in range(6)]  # role chunk and a few tokens
    assert sse_events(events)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = metrics()
        if metric(text, "kiln:num_requests_running") == 0 and \
                metric(text, "kiln:request_success_total", finished_reason="abort") == aborts_before + 1:
            break
        time.sleep(0.2)
    assert metric(text, "kiln:num_requests_running") == 0
    assert metric(text, "kiln:request_success_total", finished_reason="abort") == aborts_before + 1
    assert metric(text, "kiln:kv_cache_usage_perc") == 0.0
    assert metric(text, "kiln:time_to_first_token_seconds_count") > 0


def _quickstart_examples(base_url: str) -> tuple[dict, str]:
    """The curl body and the Python program scripts/quickstart.sh prints, for this server."""
    script = (Path(__file__).resolve().parents[2] / "scripts/quickstart.sh").read_text()
    block = script.split("cat <<EXAMPLES\n", 1)[1].split("\nEXAMPLES\n", 1)[0]
    host, port = base_url.removeprefix("http://").split(":")
    for var, value in (("${API_KEY:-unused}", KEY), ("$AUTH_HEADER", ""), ("$HOST", host), ("$PORT", port),
                       ("$MODEL", MODEL), ("\\\\", "\\")):
        block = block.replace(var, value)
    body = json.loads(re.search(r"-d '(\{.*\})'", block).group(1))
    program = block.split("python - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    return body, program


def test_the_quickstart_examples_answer_sensibly(server):
    """The printed examples run greedy (SmolLM2 sets no sampling defaults): same answer every time."""
    body, program = _quickstart_examples(server)
    answers = {httpx.post(server + "/v1/chat/completions", json=body, headers=_auth(), timeout=120)
               .json()["choices"][0]["message"]["content"] for _ in range(2)}
    (answer,) = answers
    assert "Paris" in answer
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kiln" in run.stdout.lower() and len(run.stdout.split()) >= 10
