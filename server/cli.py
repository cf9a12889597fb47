"""`serve-llm`: serve an engine directory over an OpenAI-compatible HTTP API.

    serve-llm engines/smollm2-135m --port 8000 --api-key sk-local
    serve-llm smollm2-135m              # or a Hugging Face model directory: built once, cached

SIGTERM / Ctrl-C drains: /health and new requests get 503, requests in flight finish (at
most --shutdown-timeout seconds; streams still running then get an error saying the server is
shutting down), then the process exits 0. A second signal during the drain exits at once with
status 128 + the signal number, logging how many requests it cut.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

from kiln.engine_builder.options import add_build_options, build_kwargs, with_kv_cache_scales
from kiln.runtime.config import add_speculative_arguments
from kiln.scheduler.config import CAPACITY_POLICIES
from kiln.server.config import API_KEY_ENV, ServerConfig, ServerConfigError, build_config, load_yaml
from kiln.server.launch import bind_socket, exit_on_sigterm, resolve_engine

logger = logging.getLogger("kiln.server")


class _YesNo(argparse.Action):
    """--no-prefix-caching style flags that store an explicit bool (None = not given)."""

    def __init__(self, option_strings: list[str], dest: str, value: bool, **kw: Any) -> None:
        self._value = value
        super().__init__(option_strings, dest, nargs=0, default=None, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, self._value)


def build_parser() -> argparse.ArgumentParser:
    return _make_parser()[0]


def _make_parser() -> tuple[argparse.ArgumentParser, tuple[str, ...]]:
    """The parser and the ``dest`` names of build-llm's build options, which it shares."""
    p = argparse.ArgumentParser(
        prog="serve-llm",
        description="Serve a Kiln engine directory over an OpenAI-compatible API "
                    "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, ...).",
        epilog=f"Precedence: flags > --config YAML > environment ({API_KEY_ENV}) > defaults. "
               "See configs/serve.example.yaml.",
    )
    p.add_argument("engine_dir", nargs="?", default=None, metavar="SOURCE",
                   help="an engine directory made by build-llm; or a Hugging Face model directory or "
                        "'smollm2-135m', built once into the engine cache (or engine_dir in --config)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys as the flags, with underscores)")
    s = p.add_argument_group("server")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to bind (default 8000; 0 = any free port)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                                     f"(or set {API_KEY_ENV}); /health and /metrics stay open")
    s.add_argument("--served-model-name", help="model id clients send (default: the engine directory's name)")
    s.add_argument("--max-queue", type=int, help="max waiting sequences (a request counts its prompts x n); beyond "
                                                 "it requests get 503 + Retry-After, and one that could never fit "
                                                 "a 400 (default: unbounded)")
    s.add_argument("--max-n", type=int, help="largest n (choices per prompt) a request may ask for (default 16384)")
    s.add_argument("--max-prompts", type=int, help="most prompts in one /v1/completions request (default 1024)")
    s.add_argument("--max-request-bytes", type=int,
                   help="largest request body; larger ones get 413 before being read (default 8388608 = 8 MiB)")
    s.add_argument("--shutdown-timeout", type=float,
                   help="seconds to let in-flight requests finish after SIGTERM (default 30)")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   help="default info")
    s.add_argument("--no-playground", dest="playground", action=_YesNo, value=False,
                   help="do not serve the browser playground at / (it is a static page over the API)")
    e = p.add_argument_group("engine (scheduler and KV cache)")
    e.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    e.add_argument("--max-num-tokens", type=int, help="token budget per step, prompt chunks and decodes together (default 2048: "
                   "lower time to first token when many streams arrive at once; raise it for throughput)")
    e.add_argument("--max-batch-size", type=int, help="max sequences per step (default 512)")
    e.add_argument("--block-size", type=int, help="tokens per KV block (default 32)")
    e.add_argument("--kv-cache-fraction", type=float, help="fraction of free GPU memory for the KV cache (default 0.9)")
    e.add_argument("--num-kv-cache-tokens", type=int, help="KV cache size in tokens (overrides the fraction)")
    e.add_argument("--kv-cache-dtype", choices=["auto", "model", "fp8"],
                   help="auto: FP8 when the engine has KV scales, else the model dtype (default); model: "
                        "the model dtype; fp8: FP8 even without scales (scale 1.0)")
    e.add_argument("--capacity-policy", choices=CAPACITY_POLICIES,
                   help="guaranteed_no_evict reserves KV for prompt + max_tokens; max_utilization packs and preempts")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action=_YesNo, value=False,
                   help="disable reuse of KV blocks across requests with a common prefix")
    e.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    e.add_argument("--enforce-eager", action=_YesNo, value=True, help="no CUDA graphs / compilation")
    e.add_argument("--kernel-backend", "--attention-backend", dest="kernel_backend", choices=["auto", "triton", "torch"],
                   help="implementation of every kernel: triton (CUDA), torch (reference) or auto (default); "
                        "--attention-backend is its old name")
    e.add_argument("--seed", type=int, help="engine seed for unseeded sampling (default 0)")
    e.add_argument("--no-engine-process", dest="engine_process", action=_YesNo, value=False,
                   help="run the engine in a thread of the server's process (default: its own process, "
                        "so the HTTP event loop and the engine never share a GIL)")
    e.add_argument("--devices", metavar="0,1",
                   help="GPU of each tensor-parallel rank (default 0..tp-1, within CUDA_VISIBLE_DEVICES); "
                        "the engine's tp comes from the engine directory")
    add_speculative_arguments(p.add_argument_group("speculative decoding (off by default)"))
    return p, add_build_options(p, "build options (when SOURCE is a model to build; as build-llm's)", kv_cache_flag=False)


def parse_config(argv: list[str] | None) -> ServerConfig:
    parser, build_dests = _make_parser()
    namespace = parser.parse_args(argv)
    args = {k: v for k, v in vars(namespace).items() if k not in build_dests}
    args["build_options"] = with_kv_cache_scales(build_kwargs(namespace, build_dests), namespace.kv_cache_dtype) or None
    yaml_values = load_yaml(args.pop("config")) if args.get("config") else {}
    return build_config(args, yaml_values)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ServerConfigError as e:
        print(f"serve-llm: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # until uvicorn takes over: a build cleans up
    try:
        sock = bind_socket(config.host, config.port)  # a taken port fails now, not after the load
        config = resolve_engine(config)  # builds SOURCE into the engine cache when it is a model
        engine = _load_engine(config)
    except KeyboardInterrupt:
        print("serve-llm: interrupted before serving", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # EngineConfigError, EngineFormatError paths, missing files
        print(f"serve-llm: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # engine_builder errors are not ValueErrors; keep the one-line promise
        if type(e).__module__.startswith("kiln."):
            print(f"serve-llm: error: {e}", file=sys.stderr)
            return 1
        raise
    from kiln.server.app import create_app

    app = create_app(engine, config)
    return serve(app, config, sock)


def _load_engine(config: ServerConfig) -> Any:
    """The engine in its own process (default: the HTTP process's GIL then serves the streams
    only), or in this one (--no-engine-process)."""
    if config.engine_process:
        from kiln.server.engine_process import EngineProcess

        engine = EngineProcess(config.engine)
    else:
        from kiln.runtime.engine import LLMEngine

        engine = LLMEngine(config.engine)
    stats = engine.get_stats()
    logger.info("Engine loaded from %s: %s, tp %d, max_model_len %d, KV cache %d tokens (%s)",
                config.engine.engine_dir, engine.model_config.architecture, engine.model_config.tp_size,
                engine.max_model_len, stats.kv_cache_tokens,
                "own process" if config.engine_process else "in the server's process")
    return engine


_GIL_SWITCH_INTERVAL_S = 0.001
_FORCED_EXIT_GRACE_S = 3.0


def serve(app: Any, config: ServerConfig, sock: socket.socket | None = None) -> int:
    """Run ``app`` until drained; on ``sock`` (see launch.bind_socket) when given."""
    import uvicorn

    # The engine thread and the event loop share the GIL; at the default 5 ms switch interval
    # the engine thread, which gives the GIL up at every device wait, can lose ~5 ms per step
    # to a busy event loop (many streams), which then idles the GPU.
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    # Idle keep-alive connections are kept 30 s (uvicorn's 5 s races with clients that reuse a
    # connection while the loop is busy: their next request meets a closed socket).
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                               access_log=False, timeout_graceful_shutdown=5, log_level=config.log_level,
                               timeout_keep_alive=30)
    server = DrainingServer(uv_config, app, config.shutdown_timeout)
    port = sock.getsockname()[1] if sock is not None else config.port
    logger.info("Serving model %r on http://%s:%d (auth %s%s)", config.model_name, config.host, port,
                "on" if config.api_key else "off", f"; playground http://{config.host}:{port}/"
                if config.playground else "")
    asyncio.run(server.serve(sockets=[sock] if sock is not None else None))
    return server.exit_code


def _uvicorn_server_base() -> type:
    import uvicorn

    return uvicorn.Server


class DrainingServer(_uvicorn_server_base()):  # type: ignore[misc]
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before exiting.

    uvicorn's own shutdown closes the listening socket at once, so new clients would get
    "connection refused" instead of a clear 503; draining inside the app first keeps the
    socket open and answers them, then lets uvicorn exit normally (status 0).
    """

    def __init__(self, config: Any, app: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.exit_code = 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self._exit_now(sig)
            return
        if self._loop is None:  # not started yet: stop
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self._draining = True
        logger.info("Received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _exit_now(self, sig: int) -> None:
        """A second signal during the drain: stop serving at once, cutting what is in flight."""
        cut = self._app.state.in_flight.count
        self.exit_code = 128 + sig
        logger.warning("Received %s again during the drain: exiting now (status %d), cutting %d request(s) "
                       "in flight", signal.Signals(sig).name, self.exit_code, cut)
        self.should_exit = self.force_exit = True
        # uvicorn's forced shutdown still waits for its listeners to close; never longer than this.
        watchdog = threading.Timer(_FORCED_EXIT_GRACE_S, os._exit, (self.exit_code,))
        watchdog.daemon = True
        watchdog.start()

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        from kiln.server.app import drain

        try:
            await drain(self._app, self._shutdown_timeout)
        finally:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
