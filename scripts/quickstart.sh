#!/usr/bin/env bash
# Kiln quick start: set up the environment, build the embedded SmolLM2-135M-Instruct engine,
# and serve it on http://127.0.0.1:8000 with the OpenAI-compatible API. Ctrl-C stops it.
#   HOST / PORT / ENGINE_DIR / API_KEY (all optional) override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
ENGINE_DIR=${ENGINE_DIR:-engines/smollm2-135m}
MODEL=smollm2-135m
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash scripts/setup_env.sh

if [[ -f "$ENGINE_DIR/kiln.json" ]]; then
    echo "quickstart: engine already built in $ENGINE_DIR (delete it to rebuild)"
else
    build-llm smollm2-135m --output "$ENGINE_DIR"
fi

AUTH_ARGS=()
AUTH_HEADER=""
if [[ -n "${API_KEY:-}" ]]; then
    AUTH_ARGS=(--api-key "$API_KEY")
    AUTH_HEADER=" -H 'Authorization: Bearer $API_KEY'"
fi

serve-llm "$ENGINE_DIR" --host "$HOST" --port "$PORT" --served-model-name "$MODEL" "${AUTH_ARGS[@]}" &
SERVER_PID=$!
trap 'kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID"' INT TERM

for _ in $(seq 1 300); do
    if curl -sf "http://$HOST:$PORT/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "quickstart: serve-llm exited" >&2; exit 1; fi
    sleep 1
done

cat <<EXAMPLES

Kiln is serving $MODEL on http://$HOST:$PORT  (Ctrl-C to stop)

# curl:
curl http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json'$AUTH_HEADER \\
  -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'

# Python (pip install openai):
python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://$HOST:$PORT/v1", api_key="${API_KEY:-unused}")
stream = client.chat.completions.create(
    model="$MODEL", messages=[{"role": "user", "content": "Write a haiku about kilns."}],
    max_tokens=48, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
PY

EXAMPLES
wait "$SERVER_PID"
