"""The FastAPI application: routes, authentication, access log, lifespan and draining."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kiln.server.async_engine import AsyncEngine
from kiln.server.config import ServerConfig
from kiln.server.errors import APIError, bad_request, install_error_handlers
from kiln.server.metrics import ServerMetrics
from kiln.server.playground import add_playground
from kiln.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, RequestLimits,
                                  TokenizeRequest, check_template_kwargs, conversation, messages_size)
from kiln.server.request_guard import RequestGuard
from kiln.server.sampling_defaults import sampling_defaults
from kiln.server.serving import ServingContext
from kiln.server.serving_chat import ChatServing
from kiln.server.serving_completion import CompletionServing

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("kiln.server.access")

_UNCOUNTED_PATHS = ("/health", "/metrics")


class InFlight:
    """Requests being served now (not counting /health and /metrics); the drain waits on it."""

    def __init__(self) -> None:
        self.count = 0


class AccessLog:
    """Pure ASGI middleware: one log line per request (status, time to the last byte), and the
    in-flight count. Pure ASGI so streaming responses and disconnects pass through untouched."""

    def __init__(self, app: Any, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        counted = scope["path"] not in _UNCOUNTED_PATHS

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if counted:
            self.in_flight.count += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.in_flight.count -= 1
            client = scope.get("client") or ("-", 0)
            access_logger.info('%s:%s "%s %s" %d %.1fms', client[0], client[1], scope["method"],
                               scope["path"], status or 499, (time.perf_counter() - start) * 1e3)


def _auth_dependency(api_key: str | None) -> Any:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    return Depends(check)


def create_app(engine: Any, config: ServerConfig) -> FastAPI:
    """The app around an already-loaded engine (an LLMEngine or anything with its API)."""
    model_name = config.model_name
    async_engine = AsyncEngine(engine, max_queue=config.max_queue)
    metrics = ServerMetrics(lambda: async_engine.stats, model_name)
    async_engine.metrics = metrics
    vocab_size = engine.model_config.vocab_size
    ctx = ServingContext(async_engine, engine.tokenizer, engine.max_model_len, model_name, vocab_size,
                         limits=RequestLimits(config.max_n, config.max_prompts, vocab_size),
                         sampling_defaults=sampling_defaults(config.engine.engine_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            ctx.tokenizers.shutdown()

    app = FastAPI(title="Kiln", version=_version(), lifespan=lifespan)
    in_flight = InFlight()
    app.state.ctx, app.state.in_flight, app.state.metrics = ctx, in_flight, metrics
    install_error_handlers(app)
    _add_routes(app, ctx, metrics, _auth_dependency(config.api_key))
    if config.playground:
        add_playground(app, ctx.sampling_defaults)
    app.add_middleware(RequestGuard, max_body_bytes=config.max_request_bytes)
    app.add_middleware(AccessLog, in_flight=in_flight)  # outermost: it logs the guard's answers too
    return app


def _add_routes(app: FastAPI, ctx: ServingContext, metrics: ServerMetrics, auth: Any) -> None:
    chat, completions = ChatServing(ctx), CompletionServing(ctx)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(body, raw_request)

    @app.post("/v1/completions", dependencies=[auth])
    async def create_completion(body: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(body, raw_request)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> JSONResponse:
        card = {"id": ctx.served_model_name, "object": "model", "created": _STARTED, "owned_by": "kiln",
                "root": ctx.served_model_name, "max_model_len": ctx.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        # 503 while draining too, so a load balancer stops routing here at once.
        return Response(status_code=200 if ctx.engine.is_alive and ctx.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        chat.check_ready(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Send exactly one of 'prompt' or 'messages'.", "prompt")
        if body.messages is not None:
            check_template_kwargs(body.chat_template_kwargs)
            ids = await chat.in_tokenizer_thread(messages_size(body.messages), chat.render_prompt,
                                                 conversation(body.messages), body.add_generation_prompt,
                                                 body.chat_template_kwargs, False)
        else:
            ids = await chat.in_tokenizer_thread(
                len(body.prompt), lambda tok: list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)))
        return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids})

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        chat.check_ready(body.model)
        bad = [t for t in body.tokens if not 0 <= t < ctx.vocab_size]
        if bad:
            raise bad_request(f"Token id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size}).", "tokens")
        text = await chat.in_tokenizer_thread(len(body.tokens), lambda tok: tok.decode(body.tokens))
        return JSONResponse({"prompt": text})


async def drain(app: FastAPI, timeout: float) -> None:
    """Refuse new requests (503), wait up to ``timeout`` s for those in flight, abort the rest."""
    ctx: ServingContext = app.state.ctx
    in_flight: InFlight = app.state.in_flight
    ctx.accepting = False
    deadline = time.monotonic() + timeout
    logger.info("Draining: %d request(s) in flight, waiting up to %.0fs", in_flight.count, timeout)
    while in_flight.count > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if in_flight.count > 0:
        logger.warning("Drain timed out; aborting %d request(s)", in_flight.count)
        ctx.engine.abort_all()
        await asyncio.sleep(0.5)  # let the aborted responses go out


def _version() -> str:
    try:
        return metadata.version("kiln-llm")
    except metadata.PackageNotFoundError:
        return "0.0.0"


_STARTED = int(time.time())
