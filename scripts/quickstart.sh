#!/usr/bin/env bash
# Kiln quick start: set up the environment, then serve the embedded SmolLM2-135M-Instruct on
# http://127.0.0.1:8000 with the OpenAI-compatible API and the browser playground. The first run
# builds its engine into the engine cache (~/.cache/kiln/engines); later runs reuse it.
# Ctrl-C stops it.
#   HOST / PORT / SOURCE / API_KEY (all optional) override the defaults below; SOURCE may be a
#   Hugging Face model directory or an engine directory instead of the alias.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
SOURCE=${SOURCE:-smollm2-135m}
MODEL=$(basename "$SOURCE")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash scripts/setup_env.sh

AUTH_ARGS=()
AUTH_HEADER=""
if [[ -n "${API_KEY:-}" ]]; then
    AUTH_ARGS=(--api-key "$API_KEY")
    AUTH_HEADER=" -H 'Authorization: Bearer $API_KEY'"
fi

# One step: serve-llm builds SOURCE into the engine cache when needed (a progress bar and a
# line saying where), and fails at once if the port is taken.
serve-llm "$SOURCE" --host "$HOST" --port "$PORT" --served-model-name "$MODEL" "${AUTH_ARGS[@]}" &
SERVER_PID=$!
trap 'kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID"' INT TERM

for _ in $(seq 1 900); do
    if curl -sf "http://$HOST:$PORT/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "quickstart: serve-llm exited" >&2; exit 1; fi
    sleep 1
done

# The examples ask for temperature 0 (greedy): SmolLM2's generation_config.json sets no
# sampling defaults, so a request without one samples at OpenAI's temperature 1.0, where this
# 135M model often drifts into noise (README "Serve it").
cat <<EXAMPLES

Kiln is serving $MODEL on http://$HOST:$PORT  (Ctrl-C to stop)
Playground (chat in the browser): http://$HOST:$PORT/

# curl:
curl http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json'$AUTH_HEADER \\
  -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0}'

# Python (pip install openai):
python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://$HOST:$PORT/v1", api_key="${API_KEY:-unused}")
stream = client.chat.completions.create(
    model="$MODEL", messages=[{"role": "user", "content": "Write a haiku about kilns."}],
    max_tokens=48, temperature=0, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
PY

EXAMPLES
wait "$SERVER_PID"
