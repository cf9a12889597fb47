"""The build options, defined once: `build-llm` shows them, and `serve-llm SOURCE` shows the
same flags and passes them through when it builds SOURCE into the engine cache.

Adding a flag that changes what an engine holds (a dtype, a split, a quantization) means
adding it in ``add_build_options`` and a keyword of the same name to ``build_engine``:
both commands then accept it, and the engine cache keys its builds by it.

Nothing here imports torch: ``--help`` of the commands must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The dtype names of the engine format (format.DTYPES has the torch dtypes) and their aliases.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

# Quantization defaults (calibration.py and quantize.py use these; here so --help needs no torch).
KV_CACHE_DTYPES = ("auto", "fp8")
DEFAULT_CALIB_SAMPLES = 64
DEFAULT_CALIB_SEQ_LEN = 512
DEFAULT_QUALITY_SAMPLES = 16
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the INT4 kernels take (engine_builder/int4.py, runtime/kernels/int4.py)

# The architectures the registry (architectures.py) converts, for --help without importing it;
# tests/test_cli_help.py checks the two agree.
SUPPORTED_ARCHITECTURES_HELP = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"


class DtypeError(ValueError):
    """An unknown dtype name; the message lists the accepted names."""


def canonical_dtype(name: str) -> str:
    """``name`` or one of its aliases (fp16, bf16, fp32, half, float) as the format's dtype name."""
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise DtypeError(
            f"unknown dtype {name!r} (choose from {', '.join(DTYPE_NAMES)}, or {', '.join(DTYPE_ALIASES)})"
        )
    return key


def add_build_options(parser: argparse.ArgumentParser, title: str = "build options", *,
                      kv_cache_flag: bool = True) -> tuple[str, ...]:
    """Add the flags that shape an engine; returns their ``dest`` names (see ``build_kwargs``).

    Every default is None (or False for switches) so callers can tell "not given". Values are
    checked by ``build_engine``, whose errors are one line, not by argparse. ``kv_cache_flag``
    False leaves ``--kv-cache-dtype`` to the caller (serve-llm has it as an engine option and
    passes fp8 on to a quantized build: ``with_kv_cache_scales``).
    """
    group = parser.add_argument_group(title)
    actions = [
        group.add_argument("--tp", type=int, metavar="N",
                           help="tensor-parallel size: number of rank files (default 1)"),
        group.add_argument("--dtype", metavar="DTYPE",  # checked (and aliases resolved) by build_engine
                           help="bfloat16 (bf16), float16 (fp16, half) or float32 (fp32, float) "
                                "(default: the source's torch_dtype, else bfloat16)"),
    ]
    quant = parser.add_argument_group("quantization")
    actions += [
        quant.add_argument("--fp8", action="store_true",
                           help="FP8 (E4M3) linears with per-tensor weight scales and calibrated static activation "
                                "scales (TensorRT-LLM's layout; lm_head and the embedding stay in the model dtype)"),
        quant.add_argument("--int4-awq", action="store_true",
                           help="INT4 weights, 16-bit activations (W4A16_AWQ): AWQ scales and clipping searched on "
                                "calibration text, then round-to-nearest in groups of --group-size inputs with zero "
                                "points (prints a perplexity report: source, plain INT4, AWQ)"),
        quant.add_argument("--int4", action="store_true",
                           help="INT4 weights (W4A16), plain round-to-nearest per group, no calibration"),
        quant.add_argument("--group-size", type=int, metavar="G",
                           help=f"INT4 group size: inputs sharing one scale, dividing every linear's input width "
                                f"per rank (default 128; {', '.join(map(str, INT4_GROUP_SIZES))})"),
        quant.add_argument("--int4-symmetric", action="store_true",
                           help="INT4 without zero points (symmetric groups)"),
        quant.add_argument("--calib-data", metavar="FILE",
                           help="calibration text: .txt, or .jsonl with a \"text\" field per line (default: the Python "
                                "Language Reference topics shipped with CPython, pydoc_data)"),
        quant.add_argument("--calib-samples", type=int, metavar="N",
                           help=f"calibration windows (default {DEFAULT_CALIB_SAMPLES})"),
        quant.add_argument("--calib-seq-len", type=int, metavar="L",
                           help=f"tokens per calibration window (default {DEFAULT_CALIB_SEQ_LEN})"),
        quant.add_argument("--quality-samples", type=int, metavar="N",
                           help=f"held-out windows scored for the perplexity report (default {DEFAULT_QUALITY_SAMPLES}; "
                                "0 skips the report)"),
    ]
    if kv_cache_flag:
        actions.append(quant.add_argument(
            "--kv-cache-dtype", choices=KV_CACHE_DTYPES,
            help="fp8: also store per-layer KV-cache scales (kv_cache_quant_algo FP8); with --fp8, --int4-awq or --int4"))
    return tuple(a.dest for a in actions)


def with_kv_cache_scales(build_options: dict[str, Any], kv_cache_dtype: str | None) -> dict[str, Any]:
    """serve-llm's build options: a quantized build of SOURCE served with ``--kv-cache-dtype fp8``
    also stores calibrated KV-cache scales (else the runtime would use scale 1.0)."""
    quantized = any(build_options.get(k) for k in ("fp8", "int4_awq", "int4"))
    return {**build_options, "kv_cache_dtype": "fp8"} if quantized and kv_cache_dtype == "fp8" else build_options


def build_kwargs(args: argparse.Namespace, dests: tuple[str, ...]) -> dict[str, Any]:
    """The build options that were given, as ``build_engine`` keyword arguments."""
    values = {d: getattr(args, d, None) for d in dests}
    return {k: v for k, v in values.items() if v is not None and v is not False}


def presets_dir() -> Path:
    """configs/presets of the source tree (engine_builder/ sits next to configs/)."""
    return Path(__file__).resolve().parent.parent / "configs" / "presets"


def available_presets() -> list[str]:
    """Names of the random-weight presets (configs/presets/*.json)."""
    return sorted(p.stem for p in presets_dir().glob("*.json"))
