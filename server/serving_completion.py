"""POST /v1/completions: one or several prompts (text or token ids) -> text_completion objects.

Each prompt becomes its own engine request; choice ``index`` is ``prompt_index * n + i``, as
in OpenAI's API. ``echo`` puts the prompt before the completion (with ``logprobs``, the prompt
tokens' logprobs too: None for the first, as log-likelihood scoring expects); ``suffix`` fills
in the middle between the prompt and the suffix (server/fim.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.server.async_engine import EngineRequest, EngineStepError, GenerationStream
from kiln.server.errors import bad_request
from kiln.server.fim import fim_prompt_ids, fim_template, no_fim_message
from kiln.server.logprobs import completion_logprobs, echo_logprobs, join_completion_logprobs, prompt_logprobs
from kiln.server.protocol import CompletionRequest
from kiln.server.serving import ClientDisconnected, OpenAIServing, disconnected_response, new_id, now
from kiln.server.structured import checked_constraint, requested_constraint


class CompletionServing(OpenAIServing):
    """Serves legacy completions, streaming or not."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.fim = fim_template(ctx.tokenizer)

    def prepare(self, tok: Any, req: CompletionRequest, prompts: list[str | list[int]], constraint: Any
                ) -> tuple[list[list[int]], list[str] | None]:
        """Tokenizer-lane work of one request: the constraint compiles, the prompts tokenize,
        and with ``echo`` the prompts' texts (token-id prompts decoded)."""
        checked_constraint(tok, constraint)
        ids = self.tokenize_prompts(tok, prompts, req.suffix)
        if not req.echo:
            return ids, None
        return ids, [p if isinstance(p, str) else (tok.decode(p) if tok is not None else "") for p in prompts]

    def tokenize_prompts(self, tok: Any, prompts: list[str | list[int]], suffix: str | None = None
                         ) -> list[list[int]]:
        """Text prompts tokenized as the offline engine does (runs in a tokenizer thread); the
        first prompt too long for the context ends the work. With ``suffix``, each prompt is
        the prefix of a fill-in-the-middle prompt."""
        vocab = self.ctx.vocab_size
        out = []
        for i, p in enumerate(prompts):
            if suffix is not None:
                if not isinstance(p, str):
                    raise bad_request("suffix (fill-in-the-middle) needs text prompts.", "suffix")
                ids = fim_prompt_ids(tok, self.fim[1], p, suffix)
                self.check_prompt_len(len(ids), "prompt")
                out.append(ids)
            elif isinstance(p, str):
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
        if req.suffix is not None and self.fim is None:
            raise bad_request(no_fim_message(), "suffix")
        arrival, created = now()
        prompts = req.prompts(self.ctx.limits)
        size = sum(map(len, prompts)) + len(req.suffix or "")
        constraint = requested_constraint(req)
        prompt_ids, echo_texts = await self.in_tokenizer_thread(size, self.prepare, req, prompts, constraint)
        request_id = new_id("cmpl")
        extra: dict[str, Any] = {"structured_output": constraint[0] if constraint else None}
        if req.echo and req.logprobs is not None:  # the echoed prompt's logprobs come from the engine
            extra["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
        requests = []
        for i, ids in enumerate(prompt_ids):
            max_tokens = self.max_tokens_for(len(ids), req.max_tokens, "max_tokens", "prompt")
            rid = request_id if len(prompt_ids) == 1 else f"{request_id}-{i}"
            params = req.to_sampling_params(max_tokens, self.ctx.sampling_defaults, **extra)
            requests.append(EngineRequest(rid, ids, params, arrival))
        prompt_index = {r.request_id: i for i, r in enumerate(requests)}
        echo = _Echo(echo_texts, prompt_ids, self.ctx.strings) if echo_texts is not None else None
        stream = await self.submit(requests, "prompt")
        model = self.ctx.served_model_name
        if req.stream:
            return self.sse(stream, self._chunks(stream, req, request_id, created, model, prompt_index, echo))
        try:
            finished = await self.collect(stream, raw_request)
        except ClientDisconnected:
            return disconnected_response()
        choices = []
        for (rid, i), c in finished.choices.items():
            p = prompt_index[rid]
            text, lp = c.text, None
            if req.logprobs is not None:
                lp = completion_logprobs(c.logprobs or [], self.ctx.strings, len(echo.text(p)) if echo else 0)
            if echo is not None:
                text = echo.text(p) + text
                if lp is not None:
                    lp = join_completion_logprobs(echo.logprobs(p, finished.prompt_logprobs.get(rid)), lp)
            choice = {"index": p * req.n + i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs(finished.prompt_logprobs.get(rid), self.ctx.strings)
            choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": finished.usage,
        })

    async def _chunks(self, stream: GenerationStream, req: CompletionRequest, request_id: str, created: int,
                      model: str, prompt_index: dict[str, int], echo: _Echo | None) -> AsyncIterator[dict]:
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
            p = prompt_index[out.request_id]
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise EngineStepError("The engine failed while generating this response.")
                index = p * req.n + c.index
                completion_tokens += len(c.delta_token_ids)
                if index not in offsets:  # the choice's first chunk: the echoed prompt, its prompt logprobs
                    offsets[index] = 0
                    first = self._first_chunk(req, p, echo, out.prompt_logprobs)
                    if first is not None:
                        offsets[index] = len(first["text"])
                        yield chunk([{"index": index, **first}])
                if (c.delta_text or c.finish_reason is not None or (req.logprobs is not None and c.delta_logprobs)
                        or (textless and c.delta_token_ids)):
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(c.delta_logprobs or [], self.ctx.strings, offsets[index])
                    offsets[index] += len(c.delta_text)
                    yield chunk([{"index": index, "text": c.delta_text, "logprobs": lp,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
        if req.include_usage_chunk:
            usage_chunk = chunk([])
            prompt = sum(prompt_tokens.values())
            usage_chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt + completion_tokens}
            yield usage_chunk

    def _first_chunk(self, req: CompletionRequest, p: int, echo: _Echo | None, entries: Any) -> dict | None:
        if echo is None and req.prompt_logprobs is None:
            return None
        first: dict[str, Any] = {"text": echo.text(p) if echo else "", "logprobs": None, "finish_reason": None}
        if echo is not None and req.logprobs is not None:
            first["logprobs"] = echo.logprobs(p, entries)
        if req.prompt_logprobs is not None:
            first["prompt_logprobs"] = prompt_logprobs(entries, self.ctx.strings)
        return first


class _Echo:
    """The echoed prompts of one request: their text and their logprobs objects."""

    def __init__(self, texts: list[str], prompt_ids: list[list[int]], strings: Any) -> None:
        self.texts, self.prompt_ids, self.strings = texts, prompt_ids, strings

    def text(self, p: int) -> str:
        return self.texts[p]

    def logprobs(self, p: int, entries: Any) -> dict[str, Any]:
        return echo_logprobs(entries, self.prompt_ids[p], self.strings)
