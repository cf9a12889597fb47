#!/bin/sh
# Container entrypoint: serve MODEL; by default /model when a model or an engine is mounted
# there, else the embedded smollm2-135m. MODEL may be an engine directory (served as is) or a
# Hugging Face model directory, built once at start into $KILN_CACHE_DIR (a volume: restarts
# reuse the build). Arguments go to serve-llm; KILN_API_KEY turns on auth; SERVED_MODEL_NAME
# names the model for clients. exec: serve-llm is PID 1 and gets SIGTERM itself, which drains
# the requests in flight (--shutdown-timeout, default 30 s).
set -eu
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [ -z "${MODEL:-}" ]; then
    if [ -f /model/config.json ]; then
        MODEL=/model
    else
        echo "kiln-entrypoint: nothing mounted at /model: serving the embedded smollm2-135m" >&2
        MODEL=smollm2-135m
    fi
fi
if [ -n "${SERVED_MODEL_NAME:-}" ]; then
    set -- --served-model-name "$SERVED_MODEL_NAME" "$@"
fi
exec serve-llm "$MODEL" --host 0.0.0.0 --port "${PORT:-8000}" "$@"
