"""LLM: the offline API (familiar to vLLM users) that runs an LLMEngine to completion."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.scheduler.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A prompt: text, or {"prompt": text} / {"prompt_token_ids": [...]}.
PromptType = Union[str, dict[str, Any]]
Message = dict[str, Any]


class LLM:
    """Generate from an engine directory in one call: ``LLM(path).generate(prompts, params)``.

    Invariant: every call drains the engine, so results never mix between calls and each
    call returns its outputs in input order with every choice complete.

    ``shutdown()`` (or ``with LLM(path) as llm:``) frees the device memory; deleting the
    object does not (see runtime/engine.py).
    """

    def __init__(self, engine_dir: str | Path, **options: Any) -> None:
        self.engine = LLMEngine.from_engine_dir(engine_dir, **options)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Release the engine's weights, KV cache and CUDA graphs now (``LLMEngine.shutdown``)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one or many prompts; one RequestOutput per prompt, in input order."""
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        requests = [(self._prompt_of(item), p) for item, p in zip(items, params)]
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this engine directory has none")
        if not messages:
            raise ValueError("chat needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                list(conversation),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
            # The template already holds BOS and friends: add no special tokens on top.
            prompts.append({"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False), "prompt": text})
        params = _as_params_list(sampling_params, len(prompts))
        return self._run([(self._prompt_of(p), sp) for p, sp in zip(prompts, params)], use_tqdm)

    def _prompt_of(self, item: PromptType) -> tuple[str | None, str | list[int]]:
        """(display text, what the engine tokenizes or takes as ids)."""
        if isinstance(item, str):
            return item, item
        if isinstance(item, dict):
            if "prompt_token_ids" in item:
                return item.get("prompt"), list(item["prompt_token_ids"])
            if "prompt" in item:
                return item["prompt"], item["prompt"]
        raise TypeError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {item!r}")

    def _run(self, requests: list[tuple[tuple[str | None, str | list[int]], SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the engine still has requests from elsewhere; LLM must own its engine")
        ids = [f"llm-{next(self._ids)}" for _ in requests]
        try:
            for request_id, ((_, prompt), params) in zip(ids, requests):
                self.engine.add_request(request_id, prompt, params)
            finals = self._drain(len(ids), use_tqdm)
        except BaseException:
            for request_id in ids:  # a bad prompt or Ctrl-C: leave the engine empty
                self.engine.abort_request(request_id)
            raise
        results = []
        for request_id, ((text, _), _) in zip(ids, requests):
            output = finals[request_id]
            if text is not None and output.prompt is None:
                output.prompt = text
            results.append(output)
        return results

    def _drain(self, num_requests: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        """Step until every request finished; merge each request's choices as they change."""
        progress = _progress_bar(num_requests) if use_tqdm else None
        latest: dict[str, RequestOutput] = {}
        choices: dict[str, dict[int, CompletionOutput]] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                latest[output.request_id] = output
                per_choice = choices.setdefault(output.request_id, {})
                for completion in output.outputs:
                    per_choice[completion.index] = completion
                if output.finished and progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
        return {
            rid: dataclasses.replace(out, outputs=[choices[rid][i] for i in sorted(choices[rid])])
            for rid, out in latest.items()
        }


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        raise TypeError('pass token ids as {"prompt_token_ids": [...]} (a bare list reads as many prompts)')
    return items


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts; pass one or one per prompt")
    return params


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
