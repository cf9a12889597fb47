"""What chat and completions handlers share: model check, tokenization off the event loop,
context-length checks, submission with errors translated, SSE framing, and collecting a
non-streaming result while watching for the client going away.

A prompt is checked against the context as early as it can be: from its byte length when
that proves it too long (before tokenizing), then from its token count (before tokenizing
the next prompt of the request).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from kiln.server.async_engine import (
    AsyncEngine, EngineDeadError, EngineRequest, EngineStepError, GenerationStream, QueueFullError,
)
from kiln.server.sse import SSEResponse, encode_event
from kiln.server.errors import APIError, bad_request, internal_error
from kiln.server.logprobs import TokenStrings
from kiln.server.protocol import RequestLimits
from kiln.server.tokenizing import PromptBound, TokenizerLanes, prompt_bound

logger = logging.getLogger(__name__)


@dataclass
class ServingContext:
    """State every handler reads. ``accepting`` turns False when the server starts draining."""

    engine: AsyncEngine
    tokenizer: Any
    max_model_len: int
    served_model_name: str
    vocab_size: int
    limits: RequestLimits | None = None  # None: no caps beyond the vocabulary
    accepting: bool = True
    strings: TokenStrings | None = None
    # Request defaults from generation_config.json (server/sampling_defaults.py).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    tokenizers: TokenizerLanes = field(init=False)
    bound: PromptBound | None = field(init=False)

    def __post_init__(self) -> None:
        if self.strings is None:
            self.strings = TokenStrings(self.tokenizer)
        if self.limits is None:
            self.limits = RequestLimits(max_n=2**63 - 1, max_prompts=2**63 - 1, vocab_size=self.vocab_size)
        self.tokenizers = TokenizerLanes(self.tokenizer)
        self.bound = prompt_bound(self.tokenizer)
        logger.info("prompt length pre-check: %s", f"{self.bound.bytes_per_token} bytes per token at most"
                    if self.bound else "off (this tokenizer may drop or merge input text)")


class ClientDisconnected(Exception):
    """The client closed the connection before its non-streaming response was ready."""


@dataclass
class Finished:
    """Final state of one HTTP request's generation (non-streaming)."""

    choices: dict[tuple[str, int], Any]  # (engine request id, choice index) -> CompletionOutput
    prompt_tokens: dict[str, int]

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing:
    """Base of the chat and completions handlers."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def check_ready(self, model: str | None) -> None:
        if not self.ctx.accepting:
            raise APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
        if model is not None and model != self.ctx.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def in_tokenizer_thread(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(tokenizer, *args)`` in the tokenizer lane for ``size`` characters of text."""
        return await self.ctx.tokenizers.run(size, fn, *args)

    def tokenize_checked(self, tokenizer: Any, text: str, prompt_param: str, **kwargs: Any) -> list[int]:
        """``text``'s token ids (tokenizer thread); a text too long for the context is refused
        before it is tokenized when its length proves it, else right after."""
        if tokenizer is None:
            raise bad_request("This model has no tokenizer: send the prompt as token ids.", prompt_param)
        if self.ctx.bound is not None:
            self.check_prompt_len(self.ctx.bound.min_tokens(text), prompt_param, at_least=True)
        ids = list(tokenizer(text, **kwargs)["input_ids"])
        self.check_prompt_len(len(ids), prompt_param)
        return ids

    def check_prompt_len(self, num_prompt: int, prompt_param: str, at_least: bool = False) -> None:
        limit = self.ctx.max_model_len
        if num_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{'at least ' if at_least else ''}{num_prompt} tokens, leaving no room to generate.", prompt_param)

    def max_tokens_for(self, num_prompt: int, requested: int | None, param: str, prompt_param: str) -> int:
        """``requested`` checked against the context, or the rest of the context when None."""
        limit = self.ctx.max_model_len
        self.check_prompt_len(num_prompt, prompt_param)
        if requested is None:
            # the rest of the context, capped by generation_config's max_new_tokens
            return min(limit - num_prompt, self.ctx.sampling_defaults.get("max_tokens", limit))
        if requested >= 1 and num_prompt + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has {num_prompt} "
                f"tokens and {param} is {requested} ({num_prompt + requested} in total).", param)
        return requested

    async def submit(self, requests: list[EngineRequest], prompt_param: str) -> GenerationStream:
        """Hand the requests to the engine; a rejection names its param, else ``prompt_param``."""
        try:
            return await self.ctx.engine.generate(requests)
        except QueueFullError as e:
            raise APIError(503, f"{e} Retry later.", headers={"Retry-After": "1"}) from None
        except EngineDeadError as e:
            raise _unavailable(e) from None
        except ValueError as e:  # the engine rejected the request (too long, bad params)
            raise bad_request(str(e), getattr(e, "param", None) or prompt_param) from None

    async def collect(self, stream: GenerationStream, raw_request: Request) -> Finished:
        """Run ``stream`` to the end; abort it if the client disconnects first."""
        finished = Finished({}, {})

        async def consume() -> None:
            async for out in stream:
                finished.prompt_tokens[out.request_id] = len(out.prompt_token_ids)
                for c in out.outputs:
                    if c.finish_reason == "error":
                        raise EngineStepError("The engine failed while generating this response.")
                    finished.choices[(out.request_id, c.index)] = c

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
        try:
            done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
            self.ctx.engine.abort(stream)  # no-op when everything finished
        if consumer not in done:
            raise ClientDisconnected()
        try:
            consumer.result()
        except EngineStepError:
            raise internal_error() from None
        except EngineDeadError as e:  # the server is shutting down, or the engine loop died
            raise _unavailable(e) from None
        return finished

    def sse(self, stream: GenerationStream, chunks: AsyncIterator[dict]) -> SSEResponse:
        return SSEResponse(self._sse_events(stream, chunks), ping_s=15)

    async def _sse_events(self, stream: GenerationStream, chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield encode_event(chunk)
        except EngineStepError:
            yield encode_event(internal_error().body())
        except EngineDeadError as e:
            yield encode_event(_unavailable(e).body())
        except APIError as e:
            yield encode_event(e.body())
        except Exception:  # noqa: BLE001 - a bug must not leave the stream open
            logger.exception("Error while streaming a response")
            yield encode_event(internal_error().body())
        finally:
            # Runs on normal end, on error and when SSEResponse cancels us after a disconnect.
            self.ctx.engine.abort(stream)
        yield encode_event("[DONE]")


def _unavailable(error: EngineDeadError) -> APIError:
    return APIError(503, str(error))


async def _wait_for_disconnect(raw_request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


def disconnected_response() -> Response:
    # Nobody reads it; 499 (nginx's "client closed request") keeps the access log honest.
    return Response(status_code=499)


def now() -> tuple[float, int]:
    """(monotonic arrival time for the engine, unix ``created`` for the response)."""
    return time.monotonic(), int(time.time())

