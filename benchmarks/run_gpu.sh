#!/usr/bin/env bash
# Everything the GPU figures in docs/performance.md need, in one call (about 9 minutes on an H200):
# CUDA tests, kernel benchmark, end-to-end equality, generate benchmark with full warm-up, budget.
# Results land in $OUT (default ./out). Usage: bash benchmarks/run_gpu.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -3 | tee "$OUT/tests.log"
timeout 60 python benchmarks/kernel_bench.py 2>&1 | tail -9 | tee "$OUT/kernel.log"
timeout 120 python benchmarks/e2e_gpu.py 2>&1 | grep -v Warn | tail -3 | tee "$OUT/e2e.log"
if [ "${1:-}" = quick ]; then only=greedy,mixed,beam,sample,budget; else only=greedy,mixed,beam,sample,dataset,cb,budget; fi
timeout 420 python benchmarks/generate_bench.py --full-warmup --eager-too --only "$only" 2>&1 | grep -v Warn | tee "$OUT/gen.log" | tail -12
