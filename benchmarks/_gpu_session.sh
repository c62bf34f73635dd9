set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12 | tee $OUT/tests.log

