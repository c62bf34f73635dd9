export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 330 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_cascade.py 2>&1 | tail -15 | tee $OUT/tests.log
cd benchmarks && timeout 230 python prefix_bench.py --phases --paths unshared,shared+cascade 2>&1 | grep -v Warn | grep '"phases"' | cut -c1-400
