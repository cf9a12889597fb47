#!/usr/bin/env bash
# Offline GPU benchmark of Kiln on a random-weight Llama-3.1-8B-shaped engine (bf16, or FP8).
#
#   RUNS="tests profile latency tp128 tp1000 tp2048" scripts/gpu_bench.sh
#   PRECISION=fp8 RUNS="latency tp128 tp1000 tp2048" scripts/gpu_bench.sh
#
# PRECISION=fp8 builds `--random-weights llama-3.1-8b --fp8 --kv-cache-dtype fp8` (FP8 linears,
# KV-cache scales) into $ENGINE, default /dev/shm/kiln-rand8b-fp8 (tmpfs: the build and the
# load skip the disk), and runs the same benchmarks on it.
#
# Runs (default: "latency tp128"):
#   tests     GPU pytest of the runtime (CUDA graphs vs eager, runner vs transformers)
#   profile   per-step host/GPU time split of decode steps (scripts/profile_decode.py);
#             PROFILES="1 256 256e 1et" picks batch sizes, e = enforce_eager, t = per-kernel trace
#   latency   bench-llm latency, 128/128, batch 1
#   tp128     bench-llm throughput 128/128 x N128 requests   (N128, default 3000)
#   tp1000    bench-llm throughput 1000/1000 x N1000 requests (N1000, default 1000)
#   tp2048    bench-llm throughput 2048/128 x N2048 requests  (N2048, default 1000)
#   tp1000mu  tp1000 with --capacity-policy max_utilization (admit while blocks last, preempt)
#   eager     adds --enforce-eager to every bench-llm run (comparison)
# RECORD=1 appends each bench-llm result to $OUT/history.md (bench-llm --record; set
# KILN_COMMIT when the tree has no .git), to be merged into BENCHMARKS.md's history.
# Kiln goes on PYTHONPATH through symlinks (no pip install needed); the engine is built once
# into $ENGINE (default /tmp/kiln-rand8b, never the repository). Logs go to $OUT (default
# /tmp/kiln-bench-out); the last lines printed are a table of the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUNS=${RUNS:-"latency tp128"}
PRECISION=${PRECISION:-bf16}
case $PRECISION in
    bf16) ENGINE=${ENGINE:-/tmp/kiln-rand8b}; BUILD_ARGS=() ;;
    fp8) ENGINE=${ENGINE:-/dev/shm/kiln-rand8b-fp8}; BUILD_ARGS=(--fp8 --kv-cache-dtype fp8) ;;
    *) echo "PRECISION must be bf16 or fp8"; exit 2 ;;
esac
OUT=${OUT:-/tmp/kiln-bench-out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/kp/kiln
for pkg in engine_builder scheduler runtime server; do ln -sfn "$REPO/$pkg" "/tmp/kp/kiln/$pkg"; done
export PYTHONPATH=/tmp/kp${PYTHONPATH:+:$PYTHONPATH}
EXTRA=()
[[ " $RUNS " == *" eager "* ]] && EXTRA+=(--enforce-eager)
[ "${RECORD:-0}" = 1 ] && EXTRA+=(--record "$OUT/history.md")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ ! -f "$ENGINE/kiln.json" ]; then
    start=$(date +%s)
    python -m kiln.engine_builder.cli --random-weights llama-3.1-8b --dtype bfloat16 "${BUILD_ARGS[@]}" \
        --output "$ENGINE" --force -q \
        > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
    echo "engine built in $(( $(date +%s) - start )) s"
fi

SUMMARY=()
bench() {  # bench NAME MODE ARGS...
    local name=$1; shift
    local start; start=$(date +%s)
    python -m kiln.runtime.bench "$@" "$ENGINE" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
    local rc=$?
    local line; line=$(grep -E "^(throughput|latency) on" "$OUT/$name.log" | tail -1)
    [ $rc -ne 0 ] && { tail -30 "$OUT/$name.log"; line="FAILED rc=$rc"; }
    echo "$name ($(( $(date +%s) - start )) s): $line"
    SUMMARY+=("$name | $* | ${line#* on }")
}

for run in $RUNS; do
    case $run in
        tests)
            python -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_graphs.py tests/runtime/test_runner_gpu.py \
                tests/runtime/test_engine_gpu.py tests/kernels/test_gemv.py tests/kernels/test_fp8_kernels.py \
                > "$OUT/tests.log" 2>&1; echo "tests rc=$?: $(tail -1 "$OUT/tests.log")" ;;
        profile)  # one process per configuration: each loads the 16 GB engine
            for prof in ${PROFILES:-1 256 256e}; do  # BATCH[e][t]: e = enforce_eager, t = kernel trace
                args=(--batch "${prof%%[et]*}" --steps 40)
                [[ $prof == *e* ]] && args+=(--eager)
                [[ $prof == *t* ]] && args+=(--trace)
                python scripts/profile_decode.py "$ENGINE" "${args[@]}" >> "$OUT/profile.log" 2>&1
            done
            grep -v Warning "$OUT/profile.log" ;;
        latency) bench latency latency --isl 128 --osl 128 --iterations 3 ;;
        tp128) bench tp128 throughput --isl 128 --osl 128 --num-requests "${N128:-3000}" ;;
        tp1000) bench tp1000 throughput --isl 1000 --osl 1000 --num-requests "${N1000:-1000}" ;;
        tp2048) bench tp2048 throughput --isl 2048 --osl 128 --num-requests "${N2048:-1000}" ;;
        tp1000mu) bench tp1000mu throughput --isl 1000 --osl 1000 --num-requests "${N1000:-1000}" \
                      --capacity-policy max_utilization ;;
        eager) ;;
        *) echo "unknown run $run"; exit 2 ;;
    esac
done

echo
echo "engine: $ENGINE ($PRECISION)"
echo "| run | arguments | figures |"
echo "|---|---|---|"
for row in "${SUMMARY[@]}"; do echo "| $row |"; done
