"""POST /v1/completions: one or several prompts (text or token ids) -> text_completion objects.

Each prompt becomes its own engine request; choice ``index`` is ``prompt_index * n + i``, as
in OpenAI's API.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.server.async_engine import EngineRequest, EngineStepError, GenerationStream
from kiln.server.errors import bad_request
from kiln.server.logprobs import completion_logprobs
from kiln.server.protocol import CompletionRequest
from kiln.server.serving import ClientDisconnected, OpenAIServing, disconnected_response, new_id, now


class CompletionServing(OpenAIServing):
    """Serves legacy completions, streaming or not."""

    def tokenize_prompts(self, tok: Any, prompts: list[str | list[int]]) -> list[list[int]]:
        """Text prompts tokenized as the offline engine does (runs in a tokenizer thread); the
        first prompt too long for the context ends the work."""
        vocab = self.ctx.vocab_size
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.tokenize_checked(tok, p, "prompt"))
            else:
                if not p or any(not 0 <= t < vocab for t in p):
                    raise bad_request(f"prompt {i} must be a non-empty list of token ids in [0, {vocab}).",
                                      "prompt")
                self.check_prompt_len(len(p), "prompt")
                out.append(list(p))
        return out

    async def create(self, req: CompletionRequest, raw_request: Request) -> Response:
        req.check_supported()
        req.check_limits(self.ctx.limits)
        self.check_ready(req.model)
        arrival, created = now()
        prompts = req.prompts(self.ctx.limits)
        prompt_ids = await self.in_tokenizer_thread(sum(map(len, prompts)), self.tokenize_prompts, prompts)
        request_id = new_id("cmpl")
        requests = []
        for i, ids in enumerate(prompt_ids):
            max_tokens = self.max_tokens_for(len(ids), req.max_tokens, "max_tokens", "prompt")
            rid = request_id if len(prompt_ids) == 1 else f"{request_id}-{i}"
            params = req.to_sampling_params(max_tokens, self.ctx.sampling_defaults)
            requests.append(EngineRequest(rid, ids, params, arrival))
        prompt_index = {r.request_id: i for i, r in enumerate(requests)}
        stream = await self.submit(requests, "prompt")
        model = self.ctx.served_model_name
        if req.stream:
            return self.sse(stream, self._chunks(stream, req, request_id, created, model, prompt_index))
        try:
            finished = await self.collect(stream, raw_request)
        except ClientDisconnected:
            return disconnected_response()
        choices = []
        for (rid, i), c in finished.choices.items():
            choices.append({
                "index": prompt_index[rid] * req.n + i,
                "text": c.text,
                "logprobs": completion_logprobs(c.logprobs or [], self.ctx.strings)
                if req.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        choices.sort(key=lambda ch: ch["index"])
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": finished.usage,
        })

    async def _chunks(self, stream: GenerationStream, req: CompletionRequest, request_id: str,
                      created: int, model: str, prompt_index: dict[str, int]) -> AsyncIterator[dict]:
        def chunk(choices: list[dict]) -> dict:
            return {"id": request_id, "object": "text_completion", "created": created,
                    "model": model, "choices": choices}

        prompt_tokens: dict[str, int] = {}
        completion_tokens = 0
        offsets: dict[int, int] = {}  # choice index -> text length so far (logprobs text_offset)
        # Without a tokenizer every text is empty: send a chunk per step that made tokens, so a
        # stream still shows when tokens come (TTFT, ITL) rather than nothing until the end.
        textless = self.ctx.tokenizer is None
        async for out in stream:
            prompt_tokens[out.request_id] = len(out.prompt_token_ids)
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise EngineStepError("The engine failed while generating this response.")
                index = prompt_index[out.request_id] * req.n + c.index
                completion_tokens += len(c.delta_token_ids)
                if (c.delta_text or c.finish_reason is not None or (req.logprobs is not None and c.delta_logprobs)
                        or (textless and c.delta_token_ids)):
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(c.delta_logprobs or [], self.ctx.strings, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(c.delta_text)
                    yield chunk([{"index": index, "text": c.delta_text, "logprobs": lp,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
        if req.include_usage_chunk:
            usage_chunk = chunk([])
            prompt = sum(prompt_tokens.values())
            usage_chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt + completion_tokens}
            yield usage_chunk
