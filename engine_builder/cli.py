"""``build-llm``: build a Kiln engine directory from a Hugging Face model or a preset."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from kiln.engine_builder.options import SUPPORTED_ARCHITECTURES_HELP, add_build_options, available_presets, build_kwargs

EPILOG = """\
examples:
  build-llm smollm2-135m --output engines/smollm2
      the embedded default model (SmolLM2-135M-Instruct; float32, as dequantized from its GGUF)
  build-llm /models/Llama-3.1-8B-Instruct --output engines/llama8b-tp2 --tp 2 --dtype bf16
      a Hugging Face model directory, split over 2 GPUs
  build-llm --random-weights llama-3.1-8b --output engines/rand8b --force
      random weights shaped like Llama-3.1-8B (for benchmarks; no tokenizer)
  build-llm /models/Llama-3.1-8B-Instruct --output engines/llama8b-fp8 --fp8 --kv-cache-dtype fp8
      FP8 weights and activations (calibrated; prints a perplexity report) and an FP8 KV cache

supported architectures: {architectures}
The output follows TensorRT-LLM's checkpoint layout (config.json, rank{{N}}.safetensors) plus
tokenizer files, generation_config.json and a manifest, kiln.json.
"""


def make_parser() -> tuple[argparse.ArgumentParser, tuple[str, ...]]:
    """The parser and the ``dest`` names of its build options (shared with serve-llm)."""
    parser = argparse.ArgumentParser(
        prog="build-llm",
        description="Convert a Hugging Face checkpoint into a Kiln engine directory (tensor-parallel shards + manifest).",
        epilog=EPILOG.format(architectures=SUPPORTED_ARCHITECTURES_HELP),
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
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new build is complete)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    return parser, add_build_options(parser)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the temporary folder is removed


def main(argv: list[str] | None = None) -> int:
    parser, build_dests = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    from kiln.engine_builder.build import build_engine
    from kiln.engine_builder.errors import EngineBuilderError

    try:
        summary = build_engine(
            args.source, args.output, force=args.force, progress=not args.quiet,
            random_weights=args.random_weights, seed=args.seed, **build_kwargs(args, build_dests),
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
