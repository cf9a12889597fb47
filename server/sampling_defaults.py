"""Request defaults from the engine's generation_config.json, as `vllm serve` applies them.

A model's authors put the sampling they recommend there (Llama-3.1-Instruct: temperature 0.6,
top_p 0.9; Qwen2.5: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). A request
field that is not sent takes that value; a field that is sent wins. Keys read (vLLM reads the
same ones): temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens as the
default max_tokens. ``do_sample`` is not read, as in vLLM.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
# generation_config.json key -> request field
DEFAULT_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}


class GenerationConfigError(ValueError):
    """A generation_config.json whose defaults cannot be used; the message names the key."""


def load_sampling_defaults(engine_dir: str | Path) -> dict[str, Any]:
    """The request defaults of the engine in ``engine_dir`` (empty without the file)."""
    from kiln.engine_builder.errors import SourceError
    from kiln.engine_builder.source import read_json_file

    path = Path(engine_dir) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        config = read_json_file(path, "generation config")
    except SourceError as e:
        raise GenerationConfigError(str(e)) from None
    defaults = {field: config[key] for key, field in DEFAULT_KEYS.items() if config.get(key) is not None}
    try:
        SamplingParams(**defaults)  # the same validation a request's own values get
    except (SamplingParamsError, TypeError) as e:
        raise GenerationConfigError(f"{path}: bad default: {e}") from None
    return defaults


def describe(defaults: dict[str, Any]) -> str:
    """One log line saying what a request gets when it leaves sampling fields out."""
    if not defaults:
        return ("generation_config.json has no sampling defaults: a request's unset fields take OpenAI's "
                "(temperature 1, top_p 1)")
    values = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return f"Request defaults from generation_config.json: {values} (fields a request sends win)"


def sampling_defaults(engine_dir: str | Path) -> dict[str, Any]:
    """``load_sampling_defaults``, logged; a bad file is reported and ignored, not fatal."""
    try:
        defaults = load_sampling_defaults(engine_dir)
    except GenerationConfigError as e:
        logger.warning("Ignoring the request defaults of %s", e)
        return {}
    logger.info("%s", describe(defaults))
    return defaults
