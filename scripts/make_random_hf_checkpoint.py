#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint shaped like a preset (default
llama-3.1-8b): config.json, generation_config.json, sharded *.safetensors and
model.safetensors.index.json. Streamed: one tensor in memory at a time.

Used by the build benchmark (scripts/bench_build.sh) as a stand-in for a real 16 GB
download. Example:

    python scripts/make_random_hf_checkpoint.py --preset llama-3.1-8b --output /tmp/llama8b-hf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kiln.engine_builder.format import DTYPES
from kiln.engine_builder.random_weights import RandomSource, load_preset
from kiln.engine_builder.writer import StreamingSafetensorsWriter, TensorSpec


def shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split of specs (in order) into shards of at most ``max_bytes`` (or one tensor)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b", help="preset in configs/presets (default llama-3.1-8b)")
    parser.add_argument("--output", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="max shard size in GB (default 5)")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(f"error: {args.output} already exists", file=sys.stderr)
        return 1
    config = load_preset(args.preset)
    config["torch_dtype"] = args.dtype
    source = RandomSource(config, args.seed, DTYPES[args.dtype], args.preset)
    specs = [TensorSpec(name, DTYPES[args.dtype], t.shape) for name, t in source.tensors.items()]
    shards = shard(specs, int(args.shard_gb * 1e9))
    args.output.mkdir(parents=True)
    start, weight_map, total = time.time(), {}, 0
    for i, group in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = StreamingSafetensorsWriter(args.output / file, group, {"format": "pt"})
        for spec in group:
            writer.write(spec.name, source.read(spec.name))
            weight_map[spec.name] = file
            total += spec.nbytes
        writer.close()
        print(f"{file}: {writer.bytes_written / 1e9:.2f} GB", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (args.output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (args.output / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (args.output / "generation_config.json").write_text(json.dumps(generation, indent=2))
    print(f"wrote {total / 1e9:.2f} GB of {args.preset} weights to {args.output} in {time.time() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
