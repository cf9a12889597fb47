#!/usr/bin/env bash
# Speculative decoding on one GPU (issue 13): the GPU tests, then scripts/bench_spec_gpu.py on a
# random-weight Llama-3.1-8B target with a random-weight Llama-3.2-1B draft (bf16, /dev/shm).
#
#   OUT=/tmp/kiln-spec-out ACCEPTANCE=2.5 scripts/gpu_spec_bench.sh
#
# ACCEPTANCE: the acceptance length to emulate (tokens per verify step; BENCHMARKS.md
# "Speculative decoding (CPU)" has the one SmolLM2 earns on code edits). Bounded: about 6-8
# minutes with the builds; every step has a timeout. The last lines printed are the table.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/kiln-spec-out}
TARGET=${TARGET:-/dev/shm/kiln-rand8b}
DRAFT=${DRAFT:-/dev/shm/kiln-rand1b}
ACCEPTANCE=${ACCEPTANCE:-2.5}
K=${K:-4}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/kp/kiln
for pkg in engine_builder scheduler runtime server; do ln -sfn "$REPO/$pkg" "/tmp/kp/kiln/$pkg"; done
export PYTHONPATH=/tmp/kp:$REPO/tests:$REPO/tests/runtime${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

build() {  # build DIR PRESET
    [ -f "$1/kiln.json" ] && return 0
    local start; start=$(date +%s)
    timeout 240 python3 -m kiln.engine_builder.cli --random-weights "$2" --dtype bfloat16 --output "$1" --force -q \
        > "$OUT/build-$2.log" 2>&1 || { tail -20 "$OUT/build-$2.log"; exit 1; }
    echo "engine $1 ($2) built in $(( $(date +%s) - start )) s"
}
build "$TARGET" llama-3.1-8b
build "$DRAFT" llama-3.2-1b

timeout 240 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_spec_gpu.py tests/runtime/test_cuda_graphs.py \
    tests/runtime/test_engine_gpu.py > "$OUT/tests.log" 2>&1
echo "GPU tests: $(tail -1 "$OUT/tests.log")"
timeout 420 python3 scripts/bench_spec_gpu.py --target "$TARGET" --draft "$DRAFT" --acceptance-length "$ACCEPTANCE" \
    --k "$K" --out "$OUT/spec.json" > "$OUT/bench.log" 2>&1
rc=$?
[ $rc = 0 ] || { echo "bench_spec_gpu.py failed (rc $rc):"; tail -30 "$OUT/bench.log"; exit $rc; }
sed -n '/^K=/,$p' "$OUT/bench.log"
