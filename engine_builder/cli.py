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

supported architectures: {architectures}
The output follows TensorRT-LLM's checkpoint layout (config.json, rank{{N}}.safetensors) plus
tokenizer files, generation_config.json and a manifest, kiln.json.
"""


def make_parser() -> argparse.ArgumentParser:
    from kiln.engine_builder.architectures import supported_architectures
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
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new build is complete)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    return parser


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
            progress=not args.quiet, random_weights=args.random_weights, seed=args.seed,
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
