#!/usr/bin/env bash
# CPU proxy of serving at full engine speed (issue 14): a tiny random engine (model time
# negligible), served by serve-llm, loaded by bench-llm serve at 64 streams, against
# bench-llm throughput on the same engine and the same requests in the same run.
#
#   scripts/cpu_serve_proxy.sh            # CONCURRENCY=64 PROCESSES="1 4" N=512
# Prints a table last: output tok/s served / offline, and the client's CPU use.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-proxy}
ENGINE=${ENGINE:-$OUT/tiny-engine}
PORT=${PORT:-8311}
C=${CONCURRENCY:-64}
N=${N:-512}
mkdir -p "$OUT"
# One intra-op thread: the tiny model gains nothing from more, and OpenMP threads spinning on a
# busy machine made steps 7x slower in one measurement here.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$ENGINE/kiln.json" ] || python3 -m kiln.engine_builder.cli --random-weights tiny-llama --output "$ENGINE" -q \
    > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
OPTS=(--device cpu --max-model-len 512 --num-kv-cache-tokens 65536 --max-batch-size "$C")
python3 -m kiln.server.cli "$ENGINE" --port "$PORT" --log-level warning "${OPTS[@]}" ${SERVE_FLAGS:-} \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
ROWS=()
for p in ${PROCESSES:-1 4}; do
    python3 -m kiln.server.bench_serve "http://127.0.0.1:$PORT" -n "$N" --concurrency "$C" --processes "$p" \
        --isl 128 --osl 128 --token-range 10 900 --warmup --json > "$OUT/serve_p$p.json" 2> "$OUT/serve_p$p.err"
    ROWS+=("$p | $(python3 -c "import json,sys; f=json.load(open('$OUT/serve_p$p.json'))['figures']; print(f\"{f['output_tokens_per_s']:.0f} | {f['client_cpu_cores']:.2f} | {f['ttft_p50_ms']:.0f} | {f['failed']}\")")")
done
kill -TERM $SERVER; wait $SERVER 2>/dev/null; trap - EXIT
python3 -m kiln.runtime.bench throughput "$ENGINE" --isl 128 --osl 128 --num-requests "$N" "${OPTS[@]}" --json \
    > "$OUT/offline.json" 2> "$OUT/offline.err"
OFF=$(python3 -c "import json; print(round(json.loads(open('$OUT/offline.json').readline())['figures']['output_tok_s']))")
echo "offline bench-llm throughput (same engine, $N requests, batch $C): $OFF output tok/s"
echo "| client processes | served output tok/s | client CPU cores | TTFT p50 ms | failed | served / offline |"
echo "|---|---|---|---|---|---|"
for row in "${ROWS[@]}"; do
    tok=$(echo "$row" | cut -d'|' -f2 | tr -d ' ')
    echo "| $row | $(python3 -c "print(f'{$tok / $OFF:.2f}')") |"
done
