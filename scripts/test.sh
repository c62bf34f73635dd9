#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls this script). No GPU needed: Triton kernels run
# under TRITON_INTERPRET=1; tests marked `cuda` run only where a GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
# 1. everything, on the default backend (PyTorch reference on CPU, Triton on CUDA), on the newest
#    transformers this Python has (setup.sh installs the newest release the package allows)
"$PY" -m pytest -q -p no:cacheprovider
# 2. the generate equality suite again with every attention/store/copy through the Triton kernels
#    (the plain decode kernel: the shared-prefix one, which auto mode would pick for beams and
#    samples, has its own stage, 2b; this stage takes about 8 minutes on a quiet 2-core machine
#    either way)
HF_PAGED_CASCADE=0 HF_PAGED_BACKEND=triton TRITON_INTERPRET=${TRITON_INTERPRET:-1} \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_generate_equality.py tests/test_prefix_sharing.py
#    and sliding-window layers releasing blocks under the kernels' key tiles (about 20 CPU-seconds;
#    the whole of test_window_blocks.py on the interpreter takes about 10 CPU-minutes)
HF_PAGED_BACKEND=triton TRITON_INTERPRET=${TRITON_INTERPRET:-1} \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_window_blocks.py -k "tiles or without_a_model"
# 2b. the shared-prefix (cascade) decode forced on the same kernels: beams, samples and common
#     preambles (test_prefix_sharing.py), with windows and soft-capping (Mistral, Gemma 2); about
#     2 CPU-minutes (the whole equality suite forced passes too: 71 tests, about 9 CPU-minutes)
HF_PAGED_CASCADE=1 HF_PAGED_BACKEND=triton TRITON_INTERPRET=${TRITON_INTERPRET:-1} \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_prefix_sharing.py tests/test_generate_equality.py \
    -k "prefix_sharing or mistral or gemma2"
# 3. the oldest transformers we support (5.17), in a venv layered over this Python's packages (torch
#    and the rest are shared; transformers 5.17 brings its own huggingface_hub pin); the real-model
#    (slow) tests ran in 1.
OLD=.ci-venv-transformers-5.17
[ -x "$OLD/bin/python" ] || "$PY" -m venv --system-site-packages "$OLD"
"$OLD/bin/python" -m pip install -q "transformers==5.17.0"
PYTHONPATH=$PWD "$OLD/bin/python" -m pytest -q -p no:cacheprovider -m "not slow"
