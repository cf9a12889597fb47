"""POST /v1/chat/completions: chat template -> engine -> chat.completion(.chunk) objects."""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.server.async_engine import EngineRequest, EngineStepError, GenerationStream
from kiln.server.errors import bad_request
from kiln.server.logprobs import chat_logprobs
from kiln.server.protocol import ChatCompletionRequest, messages_size
from kiln.server.serving import ClientDisconnected, OpenAIServing, disconnected_response, new_id, now


class ChatServing(OpenAIServing):
    """Serves chat completions, streaming or not."""

    def render_prompt(self, tok: Any, conversation: list[dict], add_generation_prompt: bool,
                      template_kwargs: dict[str, Any] | None, check_len: bool = True) -> list[int]:
        """The chat template applied and tokenized (runs in a tokenizer thread); with
        ``check_len`` a conversation too long for the context is refused as soon as known."""
        try:
            text = tok.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )
        except Exception as e:  # a template error is the caller's input (bad roles, kwargs)
            raise bad_request(f"Cannot apply the chat template: {e}", "messages") from None
        if check_len:
            return self.tokenize_checked(tok, text, "messages", add_special_tokens=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        req.check_supported()
        req.check_limits(self.ctx.limits)
        self.check_ready(req.model)
        arrival, created = now()
        conversation = req.conversation()
        prompt_ids = await self.in_tokenizer_thread(
            messages_size(req.messages), self.render_prompt, conversation, req.add_generation_prompt,
            req.chat_template_kwargs,
        )
        requested, param = req.requested_max_tokens
        max_tokens = self.max_tokens_for(len(prompt_ids), requested, param, "messages")
        params = req.to_sampling_params(max_tokens, self.ctx.sampling_defaults)
        request_id = new_id("chatcmpl")
        stream = await self.submit([EngineRequest(request_id, prompt_ids, params, arrival)], "messages")
        model = self.ctx.served_model_name
        if req.stream:
            return self.sse(stream, self._chunks(stream, req, request_id, created, model))
        try:
            finished = await self.collect(stream, raw_request)
        except ClientDisconnected:
            return disconnected_response()
        choices = []
        for (_, index), c in sorted(finished.choices.items(), key=lambda kv: kv[0][1]):
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs or [], self.ctx.strings) if req.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": finished.usage,
        })

    async def _chunks(self, stream: GenerationStream, req: ChatCompletionRequest, request_id: str,
                      created: int, model: str) -> AsyncIterator[dict]:
        def chunk(choices: list[dict]) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices}

        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        prompt_tokens = completion_tokens = 0
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise EngineStepError("The engine failed while generating this response.")
                completion_tokens += len(c.delta_token_ids)
                if c.delta_text or (req.logprobs and c.delta_logprobs):
                    lp = chat_logprobs(c.delta_logprobs or [], self.ctx.strings) if req.logprobs else None
                    yield chunk([{"index": c.index, "delta": {"content": c.delta_text},
                                  "logprobs": lp, "finish_reason": None}])
                if c.finish_reason is not None:
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
        if req.include_usage_chunk:
            usage_chunk = chunk([])
            usage_chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}
            yield usage_chunk
