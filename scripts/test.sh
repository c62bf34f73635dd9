#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls this script). No GPU needed: Triton kernels run
# under TRITON_INTERPRET=1; tests marked `cuda` run only where a GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# 1. everything, on the default backend (PyTorch reference on CPU, Triton on CUDA)
"$PY" -m pytest -q -p no:cacheprovider
# 2. the generate equality suite again with every attention/store/copy through the Triton kernels
HF_PAGED_BACKEND=triton TRITON_INTERPRET=${TRITON_INTERPRET:-1} \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_generate_equality.py tests/test_prefix_sharing.py
