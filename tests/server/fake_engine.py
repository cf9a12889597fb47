"""A tiny stand-in for LLMEngine with fully predictable outputs, for the server's failure paths
(a step that raises, a request the engine fails, a dead loop, a full queue) that a real model
cannot be made to hit on demand. The real-model tests live in test_openai_server.py.

Tokenizer: one token per byte (id = byte value). "Model": each step appends, per running
choice, the token after the last one (wrapping in printable ASCII), so the text of a
request is known in advance.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kiln.runtime.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from kiln.scheduler.sampling_params import SamplingParams


class ByteTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return chr(token_id)

    def apply_chat_template(self, conversation: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")


def next_token(t: int) -> int:
    return 33 + (t - 32) % 94  # printable ASCII 33..126, then wrap


def expected_text(prompt_ids: list[int], num_tokens: int) -> str:
    out, last = [], prompt_ids[-1]
    for _ in range(num_tokens):
        last = next_token(last)
        out.append(last)
    return bytes(out).decode()


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    outputs: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)


@dataclass
class _ModelConfig:
    vocab_size: int = 256
    architecture: str = "FakeForCausalLM"


class FakeEngine:
    """LLMEngine's API over the byte "model" above.

    Hooks: a prompt containing "FAIL_REQUEST" finishes with finish_reason "error" on its first
    step; ``raise_next_step`` makes the next step() raise; ``die_next_step`` raises
    SystemExit (kills the loop thread); ``step_delay`` slows steps down.
    """

    def __init__(self, max_model_len: int = 64, step_delay: float = 0.0, max_running: int = 1000) -> None:
        self.tokenizer = ByteTokenizer()
        self.model_config = _ModelConfig()
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.max_running = max_running  # later requests wait (reported in get_stats)
        self.raise_next_step = False
        self.die_next_step = False
        self.running: dict[str, _Seq] = {}
        self.aborted: list[str] = []
        self.lock = threading.Lock()

    def add_request(self, request_id, prompt, sampling_params, arrival_time=None, priority=0) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:  # as the real scheduler does (RequestRejected, no param)
            raise ValueError("the prompt is empty: at least one prompt token is needed")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}")
        metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())
        n = sampling_params.n
        seq = _Seq(request_id, ids, sampling_params, metrics, [[] for _ in range(n)], [[] for _ in range(n)])
        self.running[request_id] = seq

    def abort_request(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay)
        if self.die_next_step:
            raise SystemExit("fake engine died")
        if self.raise_next_step:
            self.raise_next_step = False
            raise RuntimeError("injected step failure")
        return [self._advance(seq) for seq in list(self.running.values())[: self.max_running]]

    def _advance(self, seq: _Seq) -> RequestOutput:
        now = time.monotonic()
        seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or now
        failing = b"FAIL_REQUEST" in bytes(seq.prompt)
        choices = []
        for i, toks in enumerate(seq.outputs):
            t = next_token(toks[-1] if toks else seq.prompt[-1])
            toks.append(t)
            lp = TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5)][: seq.params.logprobs or 0])
            seq.logprobs[i].append(lp)
            done = len(toks) >= seq.params.max_tokens
            reason = "error" if failing else ("length" if done else None)
            choices.append(CompletionOutput(
                index=i, text=bytes(toks).decode(), token_ids=list(toks), finish_reason=reason,
                logprobs=None if seq.params.logprobs is None else list(seq.logprobs[i]),
                delta_text=chr(t), delta_token_ids=[t],
                delta_logprobs=None if seq.params.logprobs is None else [lp],
            ))
        seq.metrics.first_token_time = seq.metrics.first_token_time or now
        finished = all(c.finish_reason for c in choices)
        if finished:
            del self.running[seq.request_id]
        return RequestOutput(seq.request_id, None, seq.prompt, choices, finished, seq.metrics)

    def get_stats(self) -> EngineStats:
        seqs = list(self.running.values())
        running = min(len(seqs), self.max_running)
        waiting = sum(seq.params.n for seq in seqs[self.max_running:])  # sequences, as the scheduler counts
        return EngineStats(num_running=running, num_waiting=waiting, kv_cache_usage=0.0,
                           prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                           prompt_tokens=0, generation_tokens=0)
