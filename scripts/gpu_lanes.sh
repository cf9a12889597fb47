#!/usr/bin/env bash
# Run two lists of GPU jobs side by side, one per GPU (a two-GPU machine, e.g. nvidia-h200-x2),
# each job bounded, its output in $OUT/<lane>.log; the two lanes' last lines come last.
#
#   LANE0="fp8check fp8bench" LANE1="gputests int4check int4bench spec" scripts/gpu_lanes.sh
#
# Jobs (every one on the lane's GPU only, CUDA_VISIBLE_DEVICES set; engines in /dev/shm):
#   gputests   pytest of the GPU tests (kernels compiled, runner/engine/graphs, FP8 KV, INT4, spec)
#   fp8check   scripts/check_fp8_gpu.py $FP8CHECK_ARGS    int4check  scripts/check_int4_gpu.py $INT4CHECK_ARGS
#   tinygemm   scripts/bench_int4_tinygemm_gpu.py (Kiln's W4A16 kernels vs torch._weight_int4pack_mm)
#   fp8bench   PRECISION=fp8 gpu_bench.sh latency tp128 tp1000 tp2048 (N1000/N2048 as set)
#   int4bench  PRECISION=int4 gpu_bench.sh latency latency8
#   bf16bench  gpu_bench.sh latency latency8 (the bf16 reference for the INT4 batch-8 figure)
#   spec       scripts/bench_spec_gpu.py (ACCEPTANCE, SPEC_BATCHES) on a bf16 8B target, 1B draft
#   serve      scripts/gpu_serve_bench.sh (fastapi/uvicorn must be importable; fastapi 0.165 also imports
#              opentelemetry: carry opentelemetry-api and its needs with the other wheels)
# A job's timeout is JOB_TIMEOUT_<job> seconds (defaults below). Keep NVLink multicast off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-lanes}
mkdir -p "$OUT" /tmp/kp/kiln
# Kiln goes on PYTHONPATH through symlinks (as gpu_bench.sh does); tests/ for the scripts' helpers.
for pkg in engine_builder scheduler runtime server; do ln -sfn "$PWD/$pkg" "/tmp/kp/kiln/$pkg"; done
export PYTHONPATH=/tmp/kp:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

job() {  # job NAME LANE
    local name=$1 lane=$2 limit
    limit=$(eval echo "\${JOB_TIMEOUT_$name:-}")
    local start; start=$(date +%s)
    echo "== $name (lane $lane) started $(date +%T)"
    case $name in
        gputests) # shellcheck disable=SC2086
                  timeout "${limit:-240}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider ${GPU_TESTS:-tests/kernels \
                      tests/runtime/test_cuda_graphs.py tests/runtime/test_runner_gpu.py tests/runtime/test_engine_gpu.py \
                      tests/runtime/test_fp8_kv_engine.py tests/runtime/test_int4_gpu.py tests/runtime/test_spec_gpu.py \
                      tests/runtime/test_sampler.py tests/runtime/test_logit_constraints.py} > "$OUT/gputests.log" 2>&1
                  echo "pytest rc=$?"; grep -E "^(E  |FAILED|ERROR)" "$OUT/gputests.log" | cut -c1-220 | head -40; tail -2 "$OUT/gputests.log" ;;
        fp8check) timeout "${limit:-180}" python3 scripts/check_fp8_gpu.py ${FP8CHECK_ARGS:-} --json "$OUT/fp8check.json" 2>&1 | tail -40 ;;
        int4check) timeout "${limit:-150}" python3 scripts/check_int4_gpu.py ${INT4CHECK_ARGS:-} --json "$OUT/int4check.json" 2>&1 | tail -40 ;;
        fp8bench) PRECISION=fp8 RUNS="${FP8_RUNS:-latency tp128 tp1000 tp2048}" OUT="$OUT/fp8" \
                      timeout "${limit:-360}" scripts/gpu_bench.sh 2>&1 | tail -25 ;;
        int4bench) PRECISION=int4 RUNS="latency latency8" OUT="$OUT/int4" timeout "${limit:-200}" scripts/gpu_bench.sh 2>&1 | tail -15 ;;
        bf16bench) RUNS="latency latency8" OUT="$OUT/bf16" timeout "${limit:-150}" scripts/gpu_bench.sh 2>&1 | tail -15 ;;
        spec) mkdir -p "$OUT/spec" && OUT="$OUT/spec" timeout "${limit:-300}" bash -c '
                  set -e; export PYTHONPATH=/tmp/kp:$PWD/tests:$PWD/tests/runtime${PYTHONPATH:+:$PYTHONPATH}
                  mkdir -p /tmp/kp/kiln; for p in engine_builder scheduler runtime server; do ln -sfn "$PWD/$p" /tmp/kp/kiln/$p; done
                  for e in "llama-3.1-8b /dev/shm/kiln-rand8b" "llama-3.2-1b /dev/shm/kiln-rand1b"; do set -- $e
                      [ -f "$2/kiln.json" ] || python3 -m kiln.engine_builder.cli --random-weights "$1" --dtype bfloat16 \
                          --output "$2" --force -q > "$OUT/build-$1.log" 2>&1; done
                  python3 scripts/bench_spec_gpu.py --target /dev/shm/kiln-rand8b --draft /dev/shm/kiln-rand1b \
                      --acceptance-length "${ACCEPTANCE:-3.5}" --k 4 --batches "${SPEC_BATCHES:-64}" --out "$OUT/spec.json"' \
                  > "$OUT/spec/bench.log" 2>&1; echo "spec rc=$?"; sed -n '/^K=/,$p' "$OUT/spec/bench.log"; tail -3 "$OUT/spec/bench.log" ;;
        tinygemm) timeout "${limit:-150}" python3 scripts/bench_int4_tinygemm_gpu.py 2>&1 | tail -40 ;;
        serve) ENGINE=${SERVE_ENGINE:-/dev/shm/kiln-rand8b-serve} OUT="$OUT/serve" timeout "${limit:-300}" scripts/gpu_serve_bench.sh 2>&1 | tail -15 ;;
        *) echo "unknown job $name" ;;
    esac
    echo "== $name done in $(( $(date +%s) - start )) s"
}

lane() {  # lane GPU JOBS...
    local gpu=$1; shift
    for name in "$@"; do CUDA_VISIBLE_DEVICES=$gpu job "$name" "$gpu"; done > "$OUT/lane$gpu.log" 2>&1
}

# shellcheck disable=SC2086
lane 0 ${LANE0:-} &
# shellcheck disable=SC2086
lane 1 ${LANE1:-} &
wait
for gpu in 0 1; do echo; echo "######## lane $gpu"; cat "$OUT/lane$gpu.log"; done
