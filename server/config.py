"""ServerConfig: the server's one frozen configuration, built once from CLI, YAML and env.

Precedence: command-line flag > YAML file (--config) > environment (KILN_API_KEY only) >
default. Building it validates everything and reads nothing but the YAML file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kiln.runtime.config import SPECULATIVE_OPTIONS, EngineConfig, EngineConfigError

API_KEY_ENV = "KILN_API_KEY"
# serve-llm's token budget per step (the offline API keeps EngineConfig's 8192). Streams that arrive
# together (a wave) wait for each other's prefills: on an H200 with a Llama-3.1-8B at 64 streams,
# 2048 cut the TTFT p50 from 226 to 167 ms at the same throughput (BENCHMARKS.md, issue 14); 1024
# reached 139 ms but lost 11% of the throughput.
SERVE_MAX_NUM_TOKENS = 2048

# EngineConfig fields the server exposes as flags / YAML keys.
ENGINE_OPTIONS = (
    "device", "max_num_tokens", "max_batch_size", "block_size", "kv_cache_fraction",
    "num_kv_cache_tokens", "kv_cache_dtype", "capacity_policy", "enable_prefix_caching", "max_model_len",
    "enforce_eager", "kernel_backend", "attention_backend", "seed", "devices", *SPECULATIVE_OPTIONS,
)


class ServerConfigError(ValueError):
    """A bad server option or config file; the message names the option."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``serve-llm`` needs. ``engine`` holds the runtime's own frozen config.

    Invariants: port in [0, 65535] (0 = any free port); max_queue None or >= 1 (it counts
    sequences: a request's prompts times its n); max_n, max_prompts, max_request_bytes >= 1;
    shutdown_timeout >= 0; ``api_key`` None means no authentication.
    """

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    max_queue: int | None = None
    max_n: int = 16384  # vLLM's default cap (VLLM_MAX_N_SEQUENCES)
    max_prompts: int = 1024  # prompts in one completions request (vLLM's VLLM_MAX_COMPLETION_PROMPTS)
    max_request_bytes: int = 8 * 2**20
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    engine_process: bool = True  # the engine in its own process (server/engine_process.py)
    playground: bool = True  # GET / serves the browser playground (server/static/)
    # build_engine keyword arguments (--tp, --dtype, ...) for when engine_dir names a model to
    # build into the engine cache rather than an engine (engine_builder/engine_cache.py).
    build_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be in [0, 65535], got {self.port!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 1):
            raise ServerConfigError(f"max_queue must be a positive integer, got {self.max_queue!r}")
        for name in ("max_n", "max_prompts", "max_request_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServerConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.shutdown_timeout < 0:
            raise ServerConfigError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ServerConfigError(f"log_level must be critical|error|warning|info|debug, got {self.log_level!r}")
        if self.api_key is not None and not self.api_key:
            raise ServerConfigError("api_key must not be empty")

    @property
    def model_name(self) -> str:
        """The model id clients send: --served-model-name, else the engine directory's name."""
        return self.served_model_name or Path(str(self.engine.engine_dir)).resolve().name


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"engine"}
_ALL_KEYS = _SERVER_KEYS | set(ENGINE_OPTIONS) | {"engine_dir"}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option names (underscores, as in the flags) to values."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ServerConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ServerConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ServerConfigError(f"config file {path} must hold a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - _ALL_KEYS)
    if unknown:
        raise ServerConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(_ALL_KEYS))}")
    return data


def _device_list(value: Any) -> tuple[int, ...]:
    """GPU indices from "0,1" (flag) or [0, 1] (YAML)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(str(item).strip()) for item in items)
    except (TypeError, ValueError):
        raise ServerConfigError(f"devices must be GPU indices like 0,1, got {value!r}") from None


def build_config(cli: Mapping[str, Any], yaml_values: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Merge the sources (CLI values of None mean "not given") into a ServerConfig."""
    merged: dict[str, Any] = dict(yaml_values or {})
    merged.update({k: v for k, v in cli.items() if v is not None})
    env = os.environ if environ is None else environ
    if merged.get("api_key") is None and env.get(API_KEY_ENV):
        merged["api_key"] = env[API_KEY_ENV]
    engine_dir = merged.pop("engine_dir", None)
    if not engine_dir:
        raise ServerConfigError("no engine or model given (SOURCE argument or engine_dir in --config)")
    engine_options = {k: merged.pop(k) for k in ENGINE_OPTIONS if k in merged}
    engine_options.setdefault("max_num_tokens", SERVE_MAX_NUM_TOKENS)
    if "devices" in engine_options:
        engine_options["devices"] = _device_list(engine_options["devices"])
    server_options = {k: v for k, v in merged.items() if k in _SERVER_KEYS}
    try:
        engine = EngineConfig(engine_dir=str(engine_dir), **engine_options)
    except EngineConfigError as e:
        raise ServerConfigError(str(e)) from None
    except TypeError as e:
        raise ServerConfigError(f"bad engine option: {e}") from None
    return ServerConfig(engine=engine, **server_options)
