#!/usr/bin/env bash
# Every GPU check in one go, each step time-boxed (about 10 minutes on one H100/H200):
#   1. benchmarks/gpu_check.py     CUDA correctness: fp32, fp16/bf16 autocast, merge, channels_last
#   2. benchmarks/layer_overhead.py  step time and memory vs. fine-tuning, batch 32 at 112 px
#                                  and batch 64 at 224 px (time only); the digits shape (batch
#                                  32, 32 px) and the paper's (ResNet-50, batch 96, 224 px, bf16
#                                  autocast), each eager and torch.compile'd (the digits shape
#                                  also without the ComposeGroups: cwps-hard-per-layer); the
#                                  traffic-floor lower bound beside it at 224 px
#   3. the built-in benchmark end to end on the GPU with 16-bit mixed precision (trainer=gpu),
#      on the two MNIST-derived tasks (optdigits needs scikit-learn, which GPU images may lack)
#   4. the digits shape again with the decisions that run reached (--decisions: whole layers
#      shared, which sit the hard stage's SGD step out), time only, with the traffic-floor
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR     (PYTHON=... to pick the interpreter)
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS CMD...: run, log to OUT/NAME.log, remember a failure
  local name=$1 secs=$2; shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import sys, torch, lightning, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
step gpu_check 120 $PY benchmarks/gpu_check.py
step overhead_b32_112 150 $PY benchmarks/layer_overhead.py --device cuda --out "$OUT/overhead_b32_112.json"
step overhead_b64_224 150 $PY benchmarks/layer_overhead.py --device cuda --batch 64 --size 224 \
  --skip-memory --variants finetune,cwps-soft,cwps-hard,traffic-floor --out "$OUT/overhead_b64_224.json"
COMPILED=finetune,cwps-soft,cwps-hard,finetune+compile,cwps-soft+compile,cwps-hard+compile
step overhead_digits_compile 150 $PY benchmarks/layer_overhead.py --device cuda --size 32 \
  --skip-memory --warmup 3 --variants $COMPILED,cwps-hard-per-layer \
  --out "$OUT/overhead_digits_compile.json"
step overhead_paper_bf16 240 $PY benchmarks/layer_overhead.py --device cuda --model resnet50 \
  --batch 96 --size 224 --amp bf16 --skip-memory --warmup 3 --steps 20 --variants $COMPILED \
  --out "$OUT/overhead_paper_bf16.json"
step train_amp 240 $PY -m cwps_lightning.train trainer=gpu "data.tasks=[mnist_sketch,mnist_m]" \
  trainer.enable_progress_bar=false "hydra.run.dir=$OUT/train" "paths.cache_dir=$OUT/cache"
step overhead_digits_job_decisions 120 $PY benchmarks/layer_overhead.py --device cuda --size 32 \
  --skip-memory --warmup 3 --variants finetune,cwps-soft,cwps-hard,traffic-floor \
  --decisions "$OUT/train/results.json" --out "$OUT/overhead_digits_job_decisions.json"
exit $status
