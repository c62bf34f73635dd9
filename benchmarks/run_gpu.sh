#!/usr/bin/env bash
# Everything the GPU figures in docs/performance.md need, in two parts that each fit one device call
# (under 10 minutes on an H200); results land in $OUT (default ./out).
#   bash benchmarks/run_gpu.sh checks          # CUDA tests, kernel benchmark, end-to-end equality
#   bash benchmarks/run_gpu.sh bench [quick]   # generate benchmark (full warm-up, graphs off too),
#                                              # and the peaks again with a gc.collect() before each run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
case "${1:-checks}" in
checks)
    timeout 300 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -5 | tee "$OUT/tests.log"
    timeout 60 python benchmarks/kernel_bench.py 2>&1 | tail -9 | tee "$OUT/kernel.log"
    timeout 150 python benchmarks/e2e_gpu.py 2>&1 | grep -v Warn | tail -3 | tee "$OUT/e2e.log"
    ;;
bench)
    if [ "${2:-}" = quick ]; then only=greedy,mixed,beam,sample,budget; else only=greedy,mixed,beam,sample,dataset,cb,budget; fi
    timeout 420 python benchmarks/generate_bench.py --full-warmup --eager-too --only "$only" 2>&1 | grep -v Warn | tee "$OUT/gen.log" | tail -12
    # the peaks a user's loop gets (above) against those after a gc.collect() before each run
    mkdir -p "$OUT/gc"; OUT=$OUT/gc timeout 120 python benchmarks/generate_bench.py --only beam,sample --gc-collect 2>&1 | grep -v Warn | tail -4
    ;;
esac
