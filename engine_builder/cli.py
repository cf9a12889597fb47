"""``build-llm``: build a Kiln engine directory from a Hugging Face model or a preset."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EPILOG = """\
examples:
  build-llm smollm2-135m --output engines/smollm2
      the embedded default model (SmolLM2-135M-Instruct; float32, as dequantized from its GGUF)
  build-llm /models/Llama-3.1-8B-Instruct --output engines/llama8b-tp2 --tp 2 --dtype bfloat16
      a Hugging Face model directory, split over 2 GPUs
  build-llm --random-weights llama-3.1-8b --output engines/rand8b --force
      random weights shaped like Llama-3.1-8B (for benchmarks; no tokenizer)
  build-llm /models/Llama-3.1-8B-Instruct --output engines/llama8b-fp8 --fp8 --kv-cache-dtype fp8
      FP8 weights and activations (calibrated; prints a perplexity report) and an FP8 KV cache

supported architectures: {architectures}
The output follows TensorRT-LLM's checkpoint layout (config.json, rank{{N}}.safetensors) plus
tokenizer files, generation_config.json and a manifest, kiln.json.
"""


def make_parser() -> argparse.ArgumentParser:
    from kiln.engine_builder.architectures import supported_architectures
    from kiln.engine_builder.calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
    from kiln.engine_builder.quantize import KV_CACHE_DTYPES
    from kiln.engine_builder.random_weights import available_presets

    parser = argparse.ArgumentParser(
        prog="build-llm",
        description="Convert a Hugging Face checkpoint into a Kiln engine directory (tensor-parallel shards + manifest).",
        epilog=EPILOG.format(architectures=", ".join(supported_architectures())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", nargs="?", metavar="SOURCE",
        help="a Hugging Face model directory (config.json, *.safetensors, tokenizer files) or the alias 'smollm2-135m'",
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="engine directory to create")
    parser.add_argument(
        "--random-weights", metavar="PRESET",
        help=f"build random weights shaped like PRESET instead of reading SOURCE (presets: {', '.join(available_presets())})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size: number of rank files (default 1)")
    parser.add_argument(
        "--dtype", metavar="DTYPE",
        help="bfloat16, float16 or float32 (default: the source's torch_dtype, else bfloat16)",
    )
    fp8 = parser.add_argument_group("FP8 quantization")
    fp8.add_argument("--fp8", action="store_true",
                     help="FP8 (E4M3) linears with per-tensor weight scales and calibrated static activation scales "
                          "(TensorRT-LLM's layout; lm_head and the embedding stay in the model dtype)")
    fp8.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                     help="fp8: also store per-layer KV-cache scales (kv_cache_quant_algo FP8); needs --fp8")
    fp8.add_argument("--calib-data", metavar="FILE",
                     help="calibration text: .txt, or .jsonl with a \"text\" field per line (default: the Python "
                          "Language Reference topics shipped with CPython, pydoc_data)")
    fp8.add_argument("--calib-samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="N",
                     help=f"calibration windows (default {DEFAULT_NUM_SAMPLES})")
    fp8.add_argument("--calib-seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="L",
                     help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN})")
    fp8.add_argument("--quality-samples", type=int, default=16, metavar="N",
                     help="held-out windows scored for the perplexity report (default 16; 0 skips the report)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new build is complete)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def _fp8_options(args: argparse.Namespace):
    """Fp8Options from the flags, None without --fp8 (the FP8-only flags then are errors)."""
    from kiln.engine_builder.errors import BuildOptionError
    from kiln.engine_builder.quantize import Fp8Options

    if not args.fp8:
        if args.kv_cache_dtype == "fp8" or args.calib_data is not None:
            raise BuildOptionError("--kv-cache-dtype fp8 and --calib-data need --fp8")
        return None
    return Fp8Options(kv_cache_fp8=args.kv_cache_dtype == "fp8", calib_data=args.calib_data,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                      quality_samples=args.quality_samples)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the temporary folder is removed


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    from kiln.engine_builder.build import build_engine
    from kiln.engine_builder.errors import EngineBuilderError

    try:
        summary = build_engine(
            args.source, args.output, tp=args.tp, dtype=args.dtype, force=args.force,
            progress=not args.quiet, random_weights=args.random_weights, seed=args.seed, fp8=_fp8_options(args),
        )
    except EngineBuilderError as exc:
        print(f"build-llm: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. permission denied or disk full while writing
        print(f"build-llm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build-llm: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
