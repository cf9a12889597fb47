#!/usr/bin/env bash
# Offline GPU benchmark of Kiln on a random-weight Llama-3.1-8B-shaped engine (bf16, FP8 or INT4).
#
#   RUNS="tests profile latency tp128 tp1000 tp2048" scripts/gpu_bench.sh
#   PRECISION=fp8 RUNS="latency tp128 tp1000 tp2048" scripts/gpu_bench.sh
#   PRECISION=int4 RUNS="latency latency8 tp128" scripts/gpu_bench.sh
#
# PRECISION=fp8 builds `--random-weights llama-3.1-8b --fp8 --kv-cache-dtype fp8` (FP8 linears,
# KV-cache scales) into $ENGINE, default /dev/shm/kiln-rand8b-fp8 (tmpfs: the build and the
# load skip the disk), and runs the same benchmarks on it; PRECISION=int4 builds `--int4-awq`
# (W4A16, group 128, zero points; no calibration for random weights) into /dev/shm/kiln-rand8b-int4.
#
# Runs (default: "latency tp128"):
#   tests     GPU pytest of the runtime (CUDA graphs vs eager, runner vs transformers)
#   profile   per-step host/GPU time split of decode steps (scripts/profile_decode.py);
#             PROFILES="1 256 256e 1et" picks batch sizes, e = enforce_eager, t = per-kernel trace
#   latency   bench-llm latency, 128/128, batch 1
#   latency8  bench-llm latency --batch 8, 128/128 (8 sequences decoded together)
#   tp128     bench-llm throughput 128/128 x N128 requests   (N128, default 3000)
#   tp1000    bench-llm throughput 1000/1000 x N1000 requests (N1000, default 1000)
#   tp2048    bench-llm throughput 2048/128 x N2048 requests  (N2048, default 1000)
#   tp1000mu  tp1000 with --capacity-policy max_utilization (admit while blocks last, preempt)
#   eager     adds --enforce-eager to every bench-llm run (comparison)
#   tpcheck   greedy tokens of the tp $TP engine vs a tp 1 engine of the same weights (scripts/check_tp_gpu.py)
#   tpref     tp $TP and tp 1 scored against an fp32 engine of the same bf16 weights (check_tp_gpu.py
#             --reference; one random HF checkpoint, three builds into /dev/shm)
#   tpfp32    greedy tokens of fp32 engines at tp $TP and tp 1 built from one random bf16 checkpoint (fp32
#             rounding is far below the random model's near-ties, so tokens must match)
#   allreduce all-reduce cost per decode step on $TP GPUs, NCCL vs Kiln's one-shot peer path
#             (scripts/bench_allreduce_gpu.py)
# TP=2 builds $ENGINE with --tp 2 (every run then uses two GPUs); tpcheck also builds $ENGINE_TP1.
# Multi-GPU machines: keep NVLink multicast off (NCCL_NVLS_ENABLE=0 is exported here).
# RECORD=1 appends each bench-llm result to $OUT/history.md (bench-llm --record; set
# KILN_COMMIT when the tree has no .git), to be merged into BENCHMARKS.md's history.
# Kiln goes on PYTHONPATH through symlinks (no pip install needed); the engine is built once
# into $ENGINE (default /dev/shm/kiln-rand8b[-tpN]: RAM, much faster than /tmp there; never the repository). Logs go to $OUT (default
# /tmp/kiln-bench-out); the last lines printed are a table of the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUNS=${RUNS:-"latency tp128"}
TP=${TP:-1}
PRESET=${PRESET:-llama-3.1-8b}
PRECISION=${PRECISION:-bf16}
case $PRECISION in
    bf16) SUFFIX=; BUILD_ARGS=() ;;
    fp8) SUFFIX=-fp8; BUILD_ARGS=(--fp8 --kv-cache-dtype fp8) ;;
    int4) SUFFIX=-int4; BUILD_ARGS=(--int4-awq) ;;
    *) echo "PRECISION must be bf16, fp8 or int4"; exit 2 ;;
esac
ENGINE=${ENGINE:-/dev/shm/kiln-rand8b$SUFFIX$([ "$TP" = 1 ] || echo "-tp$TP")}
ENGINE_TP1=${ENGINE_TP1:-/dev/shm/kiln-rand8b$SUFFIX}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} \
    NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
OUT=${OUT:-/tmp/kiln-bench-out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/kp/kiln
for pkg in engine_builder scheduler runtime server; do ln -sfn "$REPO/$pkg" "/tmp/kp/kiln/$pkg"; done
export PYTHONPATH=/tmp/kp${PYTHONPATH:+:$PYTHONPATH}
EXTRA=()
[[ " $RUNS " == *" eager "* ]] && EXTRA+=(--enforce-eager)
[ "${RECORD:-0}" = 1 ] && EXTRA+=(--record "$OUT/history.md")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

build() {  # build DIR TP
    [ -f "$1/kiln.json" ] && return 0
    local start; start=$(date +%s)
    python3 -m kiln.engine_builder.cli --random-weights "$PRESET" --dtype bfloat16 --tp "$2" --output "$1" --force -q \
        "${BUILD_ARGS[@]}" ${BUILD_FLAGS:-} > "$OUT/build-tp$2.log" 2>&1 || { tail -20 "$OUT/build-tp$2.log"; exit 1; }
    echo "engine $1 (tp $2, $PRECISION) built in $(( $(date +%s) - start )) s"
}
build "$ENGINE" "$TP"

SUMMARY=()
bench() {  # bench NAME MODE ARGS...
    local name=$1; shift
    local start; start=$(date +%s)
    python3 -m kiln.runtime.bench "$@" "$ENGINE" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
    local rc=$?
    local line; line=$(grep -E "^(throughput|latency) on" "$OUT/$name.log" | tail -1)
    [ $rc -ne 0 ] && { tail -30 "$OUT/$name.log"; line="FAILED rc=$rc"; }
    echo "$name ($(( $(date +%s) - start )) s): $line"
    SUMMARY+=("$name | $* | ${line#* on }")
}

for run in $RUNS; do
    case $run in
        tests)
            python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_graphs.py tests/runtime/test_runner_gpu.py \
                tests/runtime/test_engine_gpu.py tests/kernels/test_gemv.py tests/kernels/test_fp8_kernels.py \
                tests/kernels/test_int4_kernels.py tests/runtime/test_int4_gpu.py \
                > "$OUT/tests.log" 2>&1; echo "tests rc=$?: $(tail -1 "$OUT/tests.log")" ;;
        profile)  # one process per configuration: each loads the 16 GB engine
            for prof in ${PROFILES:-1 256 256e}; do  # BATCH[e][t]: e = enforce_eager, t = kernel trace
                args=(--batch "${prof%%[et]*}" --steps 40)
                [[ $prof == *e* ]] && args+=(--eager)
                [[ $prof == *t* ]] && args+=(--trace)
                python3 scripts/profile_decode.py "$ENGINE" "${args[@]}" >> "$OUT/profile.log" 2>&1
            done
            grep -v Warning "$OUT/profile.log" ;;
        latency) bench latency latency --isl 128 --osl 128 --iterations 3 ;;
        latency8) bench latency8 latency --isl 128 --osl 128 --iterations 3 --batch 8 ;;
        tp128) bench tp128 throughput --isl 128 --osl 128 --num-requests "${N128:-3000}" ;;
        tp1000) bench tp1000 throughput --isl 1000 --osl 1000 --num-requests "${N1000:-1000}" ;;
        tp2048) bench tp2048 throughput --isl 2048 --osl 128 --num-requests "${N2048:-1000}" ;;
        tp1000mu) bench tp1000mu throughput --isl 1000 --osl 1000 --num-requests "${N1000:-1000}" \
                      --capacity-policy max_utilization ;;
        eager) ;;
        tpcheck)
            build "$ENGINE_TP1" 1
            timeout 600 python3 scripts/check_tp_gpu.py "$ENGINE_TP1" "$ENGINE" > "$OUT/tpcheck.log" 2>&1
            echo "tpcheck rc=$?"; grep -v Warning "$OUT/tpcheck.log" | tail -5 ;;
        tpref)  # tp $TP and tp 1 against an fp32 engine of the same bf16 weights (one random checkpoint)
            CK=/dev/shm/kiln-hf-$PRESET
            [ -f "$CK/config.json" ] || python3 scripts/make_random_hf_checkpoint.py --preset "$PRESET" --output "$CK" \
                > "$OUT/tpref.log" 2>&1
            for spec in "float32 1 fp32" "bfloat16 1 bf16-tp1" "bfloat16 $TP bf16-tp$TP"; do
                set -- $spec
                [ -f "/dev/shm/kiln-ref-$3/kiln.json" ] || python3 -m kiln.engine_builder.cli "$CK" --dtype "$1" --tp "$2" \
                    --output "/dev/shm/kiln-ref-$3" --force -q >> "$OUT/tpref.log" 2>&1
            done
            timeout 900 python3 scripts/check_tp_gpu.py /dev/shm/kiln-ref-bf16-tp1 "/dev/shm/kiln-ref-bf16-tp$TP" \
                --reference /dev/shm/kiln-ref-fp32 >> "$OUT/tpref.log" 2>&1
            echo "tpref rc=$?"; grep "^|" "$OUT/tpref.log" ;;
        tpfp32)  # fp32 tp $TP vs fp32 tp 1 of one random checkpoint (shares the checkpoint and fp32 tp 1 with tpref)
            CK=/dev/shm/kiln-hf-$PRESET
            [ -f "$CK/config.json" ] || python3 scripts/make_random_hf_checkpoint.py --preset "$PRESET" --output "$CK" \
                > "$OUT/tpfp32.log" 2>&1
            for spec in "1 /dev/shm/kiln-ref-fp32" "$TP /dev/shm/kiln-ref-fp32-tp$TP"; do
                set -- $spec
                [ -f "$2/kiln.json" ] || python3 -m kiln.engine_builder.cli "$CK" --dtype float32 --tp "$1" --output "$2" \
                    --force -q >> "$OUT/tpfp32.log" 2>&1
            done
            timeout 600 python3 scripts/check_tp_gpu.py /dev/shm/kiln-ref-fp32 "/dev/shm/kiln-ref-fp32-tp$TP" >> "$OUT/tpfp32.log" 2>&1
            echo "tpfp32 rc=$?"; grep -v Warning "$OUT/tpfp32.log" | tail -4 ;;
        allreduce)
            timeout 300 python3 scripts/bench_allreduce_gpu.py --world "$TP" > "$OUT/allreduce.log" 2>&1
            echo "allreduce rc=$?"; grep "^|" "$OUT/allreduce.log" ;;
        *) echo "unknown run $run"; exit 2 ;;
    esac
done

echo
echo "engine: $ENGINE ($PRECISION)"
echo "| run | arguments | figures |"
echo "|---|---|---|"
for row in "${SUMMARY[@]}"; do echo "| $row |"; done
