"""What chat and completions handlers share: model check, tokenization off the event loop,
context-length checks, submission with errors translated, SSE framing, and collecting a
non-streaming result while watching for the client going away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from kiln.server.async_engine import (
    AsyncEngine, EngineDeadError, EngineRequest, EngineStepError, GenerationStream, QueueFullError,
)
from kiln.server.errors import APIError, bad_request, internal_error
from kiln.server.logprobs import TokenStrings

logger = logging.getLogger(__name__)


@dataclass
class ServingContext:
    """State every handler reads. ``accepting`` turns False when the server starts draining."""

    engine: AsyncEngine
    tokenizer: Any
    max_model_len: int
    served_model_name: str
    vocab_size: int
    accepting: bool = True
    # One tokenizer thread: HF fast tokenizers are not safe to call concurrently.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")
    )
    strings: TokenStrings | None = None
    # Request defaults from generation_config.json (server/sampling_defaults.py).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strings is None:
            self.strings = TokenStrings(self.tokenizer)


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

    async def in_tokenizer_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.ctx.tokenizer_pool, fn, *args)

    def max_tokens_for(self, num_prompt: int, requested: int | None, param: str, prompt_param: str) -> int:
        """``requested`` checked against the context, or the rest of the context when None."""
        limit = self.ctx.max_model_len
        if num_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{num_prompt} tokens, leaving no room to generate.", prompt_param)
        if requested is None:  # the rest of the context, capped by generation_config's max_new_tokens
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
            raise APIError(503, str(e)) from None
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
        except (EngineStepError, EngineDeadError):
            raise internal_error() from None
        return finished

    def sse(self, stream: GenerationStream, chunks: AsyncIterator[dict]) -> EventSourceResponse:
        return EventSourceResponse(self._sse_events(stream, chunks), sep="\n", ping=15)

    async def _sse_events(self, stream: GenerationStream, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        except (EngineStepError, EngineDeadError):
            yield json.dumps(internal_error().body())
        except APIError as e:
            yield json.dumps(e.body())
        except Exception:  # noqa: BLE001 - a bug must not leave the stream open
            logger.exception("Error while streaming a response")
            yield json.dumps(internal_error().body())
        finally:
            # Runs on normal end, on error and when sse-starlette cancels us after a disconnect.
            self.ctx.engine.abort(stream)
        yield "[DONE]"


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

