"""POST /v1/chat/completions: chat template -> engine -> chat.completion(.chunk) objects.

Tools (server/tool_calls.py): the chat template's format decides how calls are written and
parsed; "required" and named choices are grammar-constrained, "auto" parses what the model
wrote. A message with calls ends with finish_reason "tool_calls"; streamed, each call is sent
once complete, as a chunk with its id, type and name (arguments "") and one with its
arguments, the way OpenAI's deltas add up.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.server.async_engine import EngineRequest, EngineStepError, GenerationStream
from kiln.server.errors import bad_request
from kiln.server.logprobs import chat_logprobs, prompt_logprobs
from kiln.server.protocol import ChatCompletionRequest, messages_size
from kiln.server.serving import ClientDisconnected, OpenAIServing, disconnected_response, new_id, now
from kiln.server.structured import checked_constraint, requested_constraint
from kiln.server.tool_calls import (ToolCall, ToolCallParser, ToolFormat, forced_tool_constraint, markers_are_special,
                                    prepare_conversation, template_text, tool_format_for)


class ChatServing(OpenAIServing):
    """Serves chat completions, streaming or not."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.template = template_text(ctx.tokenizer)
        self.tool_format: ToolFormat = tool_format_for(self.template)

    def render_prompt(self, tok: Any, conversation: list[dict], add_generation_prompt: bool,
                      template_kwargs: dict[str, Any] | None, check_len: bool = True,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat template applied and tokenized (runs in a tokenizer thread); with
        ``check_len`` a conversation too long for the context is refused as soon as known."""
        conversation, tool_kwargs = prepare_conversation(conversation, tools or [], self.template)
        try:
            text = tok.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                **{**(template_kwargs or {}), **tool_kwargs},
            )
        except Exception as e:  # a template error is the caller's input (bad roles, kwargs)
            raise bad_request(f"Cannot apply the chat template: {e}", "messages") from None
        if check_len:
            return self.tokenize_checked(tok, text, "messages", add_special_tokens=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, tok: Any, req: ChatCompletionRequest, tools: list[dict[str, Any]], constraint: Any
                 ) -> list[int]:
        """Tokenizer-lane work of one request: the constraint compiles, the prompt renders."""
        checked_constraint(tok, constraint)
        return self.render_prompt(tok, req.conversation(), req.add_generation_prompt, req.chat_template_kwargs,
                                  tools=tools)

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        req.check_supported()
        req.check_limits(self.ctx.limits)
        self.check_ready(req.model)
        arrival, created = now()
        mode, tools = req.tool_mode()
        constraint = requested_constraint(req)
        forced = forced_tool_constraint(self.tool_format, mode, tools, req.parallel_tool_calls)
        if forced is not None:
            if constraint is not None:
                raise bad_request(f"A required or named tool_choice cannot be combined with {constraint[1]}.",
                                  "tool_choice")
            constraint = (forced, "tools")
        prompt_ids = await self.in_tokenizer_thread(messages_size(req.messages), self._prepare, req, tools, constraint)
        requested, param = req.requested_max_tokens
        max_tokens = self.max_tokens_for(len(prompt_ids), requested, param, "messages")
        extra: dict[str, Any] = {"structured_output": constraint[0] if constraint else None}
        if tools and markers_are_special(self.ctx.tokenizer, self.tool_format):
            extra["skip_special_tokens"] = False  # the call markers must reach the parser
        params = req.to_sampling_params(max_tokens, self.ctx.sampling_defaults, **extra)
        request_id = new_id("chatcmpl")
        stream = await self.submit([EngineRequest(request_id, prompt_ids, params, arrival)], "messages")
        model = self.ctx.served_model_name
        fmt = self.tool_format if tools else None
        if req.stream:
            return self.sse(stream, self._chunks(stream, req, request_id, created, model, fmt))
        try:
            finished = await self.collect(stream, raw_request)
        except ClientDisconnected:
            return disconnected_response()
        choices = []
        for (_, index), c in sorted(finished.choices.items(), key=lambda kv: kv[0][1]):
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish_reason = c.finish_reason
            if fmt is not None:
                content, calls = fmt.parse(c.text)
                calls = calls if req.parallel_tool_calls else calls[:1]  # "auto": the model's first call
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [call.to_openai() for call in calls]}
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choices.append({
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs or [], self.ctx.strings) if req.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            })
        body = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": finished.usage}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs(finished.prompt_logprobs.get(request_id), self.ctx.strings)
        return JSONResponse(body)

    async def _chunks(self, stream: GenerationStream, req: ChatCompletionRequest, request_id: str,
                      created: int, model: str, fmt: ToolFormat | None) -> AsyncIterator[dict]:
        def chunk(choices: list[dict]) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices}

        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        parsers: dict[int, _ChoiceTools] = {}
        prompt_tokens = completion_tokens = 0
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise EngineStepError("The engine failed while generating this response.")
                completion_tokens += len(c.delta_token_ids)
                text, deltas = c.delta_text, []
                if fmt is not None:
                    tools = parsers.setdefault(c.index, _ChoiceTools(fmt.new_parser(), req.parallel_tool_calls))
                    text, deltas = tools.feed(c.delta_text, c.finish_reason is not None)
                if text or (req.logprobs and c.delta_logprobs):
                    lp = chat_logprobs(c.delta_logprobs or [], self.ctx.strings) if req.logprobs else None
                    yield chunk([{"index": c.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
                for delta in deltas:
                    yield chunk([{"index": c.index, "delta": {"tool_calls": [delta]}, "logprobs": None,
                                  "finish_reason": None}])
                if c.finish_reason is not None:
                    called = c.index in parsers and parsers[c.index].count > 0
                    reason = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                  "finish_reason": reason, "stop_reason": c.stop_reason}])
        if req.include_usage_chunk:
            usage_chunk = chunk([])
            usage_chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}
            yield usage_chunk


class _ChoiceTools:
    """One streamed choice's tool-call parsing: content to pass on and call deltas to send
    (only the first call when ``parallel`` is False, as the non-streamed response keeps)."""

    def __init__(self, parser: ToolCallParser, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self.count = 0

    def feed(self, text: str, last: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls = self.parser.feed(text)
        if last:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        deltas = []
        for call in calls:
            if self.parallel or self.count == 0:
                deltas.extend(self._deltas(call))
        return content, deltas

    def _deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        index, self.count = self.count, self.count + 1
        return [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
                {"index": index, "function": {"arguments": call.arguments}}]
