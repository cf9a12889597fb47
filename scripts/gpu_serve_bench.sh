#!/usr/bin/env bash
# serve-llm under load on a GPU: the random-weight Llama-3.1-8B engine, bench-llm serve at
# several concurrencies (128-token prompts of random ids, 128 output tokens, EOS ignored),
# against bench-llm throughput on the same engine and the same number of requests in the same
# run (served / offline is the figure issue 14 sets targets on).
#
#   scripts/gpu_serve_bench.sh            # CONCURRENCY="1 64 256" by default
#   ENGINE=DIR TOKEN_RANGE="10 900" CONCURRENCY="1 8" scripts/gpu_serve_bench.sh   # a tiny engine, on CPU
#   SERVE_FLAGS="--no-engine-process" scripts/gpu_serve_bench.sh                  # the engine in a thread
#
# The load comes from several client processes at high concurrency (bench-llm serve
# --processes: one Python client cannot parse hundreds of streams; client_cpu_cores shows how
# busy they were). Like gpu_bench.sh: Kiln goes on PYTHONPATH through symlinks, the engine is
# built once into $ENGINE (default /dev/shm/kiln-rand8b), logs go to $OUT; fastapi and uvicorn
# must be importable (see /work/.library/device/README.md for carrying wheels). Prints a table last.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ENGINE=${ENGINE:-/dev/shm/kiln-rand8b}
OUT=${OUT:-/tmp/kiln-bench-out}
PORT=${PORT:-8300}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/kp/kiln
for pkg in engine_builder scheduler runtime server; do ln -sfn "$REPO/$pkg" "/tmp/kp/kiln/$pkg"; done
export PYTHONPATH=/tmp/kp${PYTHONPATH:+:$PYTHONPATH}

if [ ! -f "$ENGINE/kiln.json" ]; then
    python3 -m kiln.engine_builder.cli --random-weights llama-3.1-8b --dtype bfloat16 --output "$ENGINE" --force -q \
        > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
fi
python3 -m kiln.server.cli "$ENGINE" --port "$PORT" --log-level warning ${SERVE_FLAGS:-} > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -30 "$OUT/server.log"; exit 1; }
    sleep 1
done
ROWS=()
for c in ${CONCURRENCY:-1 64 256}; do
    n=$(( c == 1 ? 8 : 4 * c ))
    p=$(( c >= 128 ? 8 : (c >= 16 ? 4 : 1) ))
    python3 -m kiln.server.bench_serve "http://127.0.0.1:$PORT" -n "$n" --concurrency "$c" --processes "$p" \
        --isl 128 --osl 128 --token-range ${TOKEN_RANGE:-1000 20000} --warmup \
        > "$OUT/serve_c$c.log" 2>&1 || { tail -20 "$OUT/serve_c$c.log"; exit 1; }
    grep -v "^settings" "$OUT/serve_c$c.log"
    ROWS+=("$c | $n | $(grep -E '^(output_tokens_per_s|failed|client_cpu_cores|(ttft|tpot|itl)_(p50|p99)_ms) ' \
        "$OUT/serve_c$c.log" | tr -s ' ' | paste -sd ';' -)")
done
kill -TERM $SERVER; wait $SERVER; echo "server exit code $?"
trap - EXIT
# Offline, same engine and workload, in the same run: what the server should approach.
for c in ${CONCURRENCY:-1 64 256}; do
    [ "$c" = 1 ] && continue
    python3 -m kiln.runtime.bench throughput "$ENGINE" --isl 128 --osl 128 --num-requests $(( 4 * c )) \
        --max-batch-size "$c" > "$OUT/offline_c$c.log" 2>&1
    ROWS+=("offline, batch $c | $(( 4 * c )) | $(grep -E '^throughput on' "$OUT/offline_c$c.log")")
done
echo
echo "| concurrency | requests | figures |"
echo "|---|---|---|"
for row in "${ROWS[@]}"; do echo "| $row |"; done
