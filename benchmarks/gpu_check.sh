#!/bin/sh
# For whoever has an NVIDIA GPU: the TensorRT/GPU tests, then the GPU latency benchmark. Under 8 minutes.
#   benchmarks/gpu_check.sh            (uses .venv/bin/python; PYTHON=... to choose another)
# Needs a CUDA build of torch, and for the TensorRT parts `pip install -e '.[trt]'` (and '.[gpu]' for ORT CUDA).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0)"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed (trt tests will skip)"
timeout 150 $PY -m pytest -q -rs -m "trt or gpu" tests
tests=$?
timeout 120 $PY -m benchmarks.gpu_latency --runs 100 --out out/gpu_latency
bench=$?
# the LoRA paper's grid on GPT-2 medium (random weights), torch CUDA eager and CUDA graphs, base vs Houlsby r=8
timeout 200 $PY -m benchmarks.latency --model gpt2-medium --grid paper --variants base,houlsby \
    --backends torch-cuda,torch-cuda-graphs --rounds 5 --calls 5 --out out/gpt2_medium_cuda
grid=$?
echo "gpu_check: tests exit $tests, MiniLM benchmark exit $bench, GPT-2 medium grid exit $grid (124 = timed out)"
echo "reports: out/gpu_latency/, out/gpt2_medium_cuda/"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$grid" -eq 0 ]
