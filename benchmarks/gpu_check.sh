#!/bin/sh
# For whoever has an NVIDIA GPU: the TensorRT/GPU tests, then the GPU latency benchmark. Under 8 minutes.
#   benchmarks/gpu_check.sh            (uses .venv/bin/python; PYTHON=... to choose another)
# Needs a CUDA build of torch, and for the TensorRT parts `pip install -e '.[trt]'` (and '.[gpu]' for ORT CUDA).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0)"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed (trt tests will skip)"
timeout 270 $PY -m pytest -q -rs -m "trt or gpu" tests
tests=$?
timeout 200 $PY -m benchmarks.gpu_latency --runs 100 --out out/gpu_latency
bench=$?
echo "gpu_check: tests exit $tests, benchmark exit $bench (124 = timed out); report in out/gpu_latency/"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
