#!/bin/sh
# For whoever has an NVIDIA GPU: the adapter's latency on GPU in one prepared run of under 8 minutes (BUDGET_S).
#   benchmarks/gpu_check.sh                   uses .venv/bin/python if there is one, else python3
#   PYTHON=... REPORTS=dir MODEL=minilm-random BUDGET_S=450 benchmarks/gpu_check.sh
# Steps, most important first; each is capped with `timeout` at what is left of BUDGET_S, so a slow step costs the
# later ones, never the whole run (the harness rewrites its reports after each grid point):
#   1. GPT-2 medium (random weights, fp32, TF32 off), batch 1 x seq 128: base, houlsby, houlsby-kernel,
#      lora-merged under torch CUDA eager, CUDA graphs, torch.compile (Inductor, mode "default") and torch.compile
#      with CUDA graphs ("reduce-overhead"); 16 worker processes, compile time excluded. (houlsby-folded measured
#      slower than plain in a CUDA graph on an H200, so it is left out here; add it to VARIANTS to measure it.)
#   2. the `gpu` tests (the Triton kernel against the CPU reference)
#   3. generation with the KV cache on torch CUDA (the GPU rows): GPT-2 medium shape, base, houlsby, lora,
#      lora-merged, greedy, prefill 128, time to first token, decode tok/s at batch 1 and 8 (benchmarks/generate.py
#      --backend torch-cuda)
#   3b. the same on ONNX Runtime CUDA (--backend ort-cuda: `Generator` with IO binding, the cache kept on the GPU),
#      base and houlsby; only where onnxruntime has the CUDAExecutionProvider (onnxruntime-gpu, `pip install -e
#      '.[gpu]'`), else skipped with a line. Each variant is exported and checked on the CPU first, most of the step
#      (GPT-2 medium base: 153 s on a shared 2-core machine), so it is capped at 240 s and, where it runs, takes
#      budget from steps 4-5 (measured in earlier runs); the ORT CUDA rows have never been taken
#   3c. `surgery train` on CUDA, as a user runs it: MiniLM with a classification head and Houlsby r=8, 40 steps at
#      batch 16 x 128 under bf16 autocast, then the same in fp32 (--no-bf16); the --json summaries (examples/s,
#      losses) in $REPORTS/train_cuda/; then the trained model exported and checked against torch on the CPU
#   4. MODEL (MiniLM) at batch 1 x seq 128, the same variants and backends as 1
#   5. the LoRA paper's grid (16x256, 32x512) on GPT-2 medium, CUDA graphs: base, houlsby, houlsby-kernel
#   6. TensorRT and ONNX Runtime CUDA against torch, MiniLM: only where one of them is installed
# COMPILE_MODE=max-autotune switches the compile backends to max-autotune-no-cudagraphs / max-autotune (minutes
# of autotuning per model: raise BUILD_S). Needs a CUDA build of torch; Triton for the fused bottleneck kernel.
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
BUDGET_S=${BUDGET_S:-450}
BUILD_S=${BUILD_S:-200}   # per grid point: loading, compiling and capturing, all workers together
COMPILE_MODE=${COMPILE_MODE:-default}
START=$(date +%s)
mkdir -p "$REPORTS"
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# run CAP CMD...: CMD under `timeout min(CAP, what is left)`; 125 (skipped) when under 20 s are left
run() {
    cap=$1; shift
    t=$(left); [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then echo "gpu_check: skipped (budget spent): $*"; return 125; fi
    echo "gpu_check: [$(( $(date +%s) - START )) s] timeout $t $*"
    timeout -k 5 "$t" "$@"
}
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); sys.exit(not torch.cuda.is_available())" \
    || { echo "gpu_check: torch sees no CUDA GPU; run it on a GPU machine with a CUDA build of torch"; exit 2; }
$PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed (no fused bottleneck kernel)"
$PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed (trt tests and benchmarks skip)"
VARIANTS=base,houlsby,houlsby-kernel,lora-merged
BACKENDS=torch-cuda,torch-cuda-graphs,torch-cuda-compile,torch-cuda-compile-graphs
COMMON="--grid 1x128 --variants $VARIANTS --backends $BACKENDS --compile-mode $COMPILE_MODE --build-timeout $BUILD_S --target 3"
run 330 $PY -m benchmarks.latency --model gpt2-medium $COMMON --rounds 12 --calls 10 \
    -o "$REPORTS/gpt2_medium_b1" --work "$WORK/gpt2"
gpt2=$?
rm -rf "$WORK/gpt2"
run 60 $PY -m pytest -q -rs -p no:cacheprovider -m "trt or gpu" tests
tests=$?
run 150 $PY -m benchmarks.generate --model gpt2-medium --backend torch-cuda --variants base,houlsby,lora,lora-merged \
    --rounds 1 --alternations 2 -o "$REPORTS/generate"
gen=$?
ortgen=0
if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    run 240 $PY -m benchmarks.generate --model gpt2-medium --backend ort-cuda --variants base,houlsby \
        --rounds 1 --alternations 3 -o "$REPORTS/generate"
    ortgen=$?
else
    echo "gpu_check: skipped generation on ORT CUDA: onnxruntime has no CUDAExecutionProvider (pip install -e '.[gpu]')"
fi
mkdir -p "$REPORTS/train_cuda"
$PY -c "import json, random; r = random.Random(0); words = 'good bad fine poor great awful film plot acting'.split()
open('$WORK/train.jsonl', 'w').writelines(json.dumps({'text': ' '.join(r.choices(words, k=100)), 'label': r.randrange(2)}) + chr(10) for _ in range(640))"
run 150 bash -c "$PY -m cli.main insert --r 8 minilm --task sequence-classification -o '$WORK/m.adapted.pt2' &&
    $PY -m cli.main train '$WORK/m.adapted.pt2' --data '$WORK/train.jsonl' --task seq-cls --device cuda --max-steps 40 \
        --batch-size 16 --max-length 128 --json -o '$WORK/bf16.adapted.pt2' > '$REPORTS/train_cuda/bf16.json' &&
    $PY -m cli.main train '$WORK/m.adapted.pt2' --data '$WORK/train.jsonl' --task seq-cls --device cuda --max-steps 40 \
        --batch-size 16 --max-length 128 --no-bf16 --json -o '$WORK/fp32.adapted.pt2' > '$REPORTS/train_cuda/fp32.json' &&
    $PY -m cli.main export '$WORK/bf16.adapted.pt2' -o '$WORK/bf16.onnx' --json > '$REPORTS/train_cuda/export.json'"
train=$?
run 120 $PY -m benchmarks.latency --model "$MODEL" $COMMON --rounds 12 --calls 10 \
    -o "$REPORTS/minilm_b1" --work "$WORK/minilm"
minilm=$?
run 150 $PY -m benchmarks.latency --model gpt2-medium --grid 16x256,32x512 --rounds 5 --calls 3 \
    --variants base,houlsby,houlsby-kernel --backends torch-cuda-graphs --target 3 \
    -o "$REPORTS/gpt2_medium_paper" --work "$WORK/gpt2p"
grid=$?
trt=0
if $PY -c "import importlib.util as u, onnxruntime as o, sys; sys.exit(not (u.find_spec('tensorrt') or 'CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null; then
    run 120 $PY -m benchmarks.gpu_latency --model "$MODEL" --runs 100 -o "$REPORTS/gpu_latency"
    trt=$?
fi
rm -rf "$WORK"
echo "gpu_check: [$(( $(date +%s) - START )) s] GPT-2 medium b1 exit $gpt2, tests exit $tests, generate exit $gen," \
     "generate on ORT CUDA exit $ortgen, train on CUDA exit $train, MiniLM exit $minilm," \
     "paper grid exit $grid, TensorRT/ORT CUDA exit $trt (124 = timed out, 125 = no budget left)"
echo "reports: $REPORTS/gpt2_medium_b1/, $REPORTS/generate/, $REPORTS/train_cuda/, $REPORTS/minilm_b1/, $REPORTS/gpt2_medium_paper/, $REPORTS/gpu_latency/"
[ "$gpt2" -eq 0 ] && [ "$tests" -eq 0 ] && [ "$gen" -eq 0 ] && [ "$ortgen" -eq 0 ] && [ "$train" -eq 0 ] && [ "$minilm" -eq 0 ] && [ "$grid" -eq 0 ] && [ "$trt" -eq 0 ]
