#!/usr/bin/env bash
# Every GPU check in one go, most important first, inside one time budget (a lent GPU machine
# gives a session minutes, not hours). Each step is time-boxed at min(its own limit, the time
# left); a step that would get under 20 s is skipped and named in the summary, and one stopped
# by the end of the budget (rather than by its own limit) is named so, not counted as failed.
#   1. gpu_check                 CUDA correctness (benchmarks/gpu_check.py): every layer path
#                                (autograd, large kernel, 1x1 output, grouped), fp32, fp16/bf16
#                                autocast, merge, channels_last; cwps.compose=step against
#                                the forward compose over soft and hard steps (the step
#                                compiled in fp32 channels_last, eager in bf16)
#   2. overhead_paper_bf16       the paper's shape (ResNet-50, batch 96, 224 px, bf16 autocast):
#                                fine-tuning, CWPS soft and hard, eager
#   3. overhead_digits_compile   the digits shape (resnet18, batch 32, 32 px): the three eager,
#                                each compiled (torch.compile's default mode),
#                                cwps-hard-per-layer (without the ComposeGroups), and the
#                                step-compose prototype and the core's cwps.compose=step
#                                (the composed weight written by a compiled optimiser step;
#                                the forward is fine-tuning's: whether it cures the
#                                launch-bound step)
#   4. train_amp                 the built-in benchmark end to end on the GPU, 16-bit mixed
#                                precision (trainer=gpu), on the two MNIST-derived tasks
#   5. overhead_digits_job_decisions  the digits shape with the decisions step 4 reached
#                                (whole layers shared sit the hard step out), with the
#                                traffic-floor lower bound
#   6. overhead_paper_bf16_compile  the paper's shape compiled (eager fine-tuning beside it)
#   7. overhead_digits_cudagraphs   the digits shape under mode="reduce-overhead" (CUDA graphs)
# (Steps 1-3 are capped at 450 s together: a 470 s budget runs them whatever happens; the rest
# run in what they leave.)
# (Peak memory on the GPU: python benchmarks/layer_overhead.py --device cuda, batch 32, 112 px.)
# A benchmark step stopped by its limit still writes its JSON: the rounds every variant finished
# (layer_overhead.py reports them on SIGTERM, with "stopped" in the JSON).
# What comes back: OUT/summary.txt (GPU, versions, each step's exit and seconds), OUT/steps.log
# (every step's output) and one JSON per benchmark step (train_amp: its results.json): at most
# eight files, so that a tool that returns few files gets them all. The training run itself
# writes under WORK (default /tmp/cwps_gpu_suite), not OUT.
# A GPU image without Hydra/OmegaConf/mlxtend: python benchmarks/gpu_site.py .gpusite here,
# then PYTHONPATH=$PWD/.gpusite there.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [BUDGET_SECONDS, default 600]
#        (PYTHON=... picks the interpreter; exit 1 if any step that ran failed, 2 before any
#        step without a visible GPU; the training run starts afresh each time, WORK/train is
#        cleared first)
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [BUDGET_SECONDS]}
BUDGET=${2:-600}
case $BUDGET in '' | *[!0-9]*) echo "BUDGET_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
BUDGET=$((10#$BUDGET))  # (a leading zero is not octal)
WORK=${WORK:-/tmp/cwps_gpu_suite}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
status=0
step() {  # step NAME MAX_SECONDS CMD...: run time-boxed, log to OUT/steps.log
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local secs=$((max < left ? max : left))
  if [ "$secs" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (limit $secs s)" | tee -a "$OUT/summary.txt" "$OUT/steps.log"
  local t0=$SECONDS
  # (-k: a step that ignores the TERM, Lightning handles it, is killed 10 s later)
  timeout -k 10 "$secs" "$@" >>"$OUT/steps.log" 2>&1
  local rc=$?
  local why="" failed=$(( rc != 0 ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    if [ "$secs" -lt "$max" ]; then why=" (stopped at the end of the budget)"; failed=0
    else why=" (time limit)"; fi
  fi
  echo "== $name: exit $rc$why, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt" "$OUT/steps.log"
  [ "$failed" -eq 0 ] || status=1
}
bench() { step "$1" "$2" $PY benchmarks/layer_overhead.py --device cuda --out "$OUT/$1.json" "${@:3}"; }
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "(no nvidia-smi on this machine)"; fi
  $PY -c "import sys, torch, lightning, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
} 2>&1 | tee -a "$OUT/summary.txt"
# no torch or no GPU: one line and exit 2, rather than every step failing in turn
$PY -c "import sys, importlib.util as u; u.find_spec('torch') or sys.exit(3); import torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
case $? in
  0) ;;
  3) echo "error: $PY cannot import torch (PYTHON=... picks the interpreter); the suite runs nothing" | tee -a "$OUT/summary.txt" >&2; exit 2 ;;
  *) echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); the suite runs nothing without one" | tee -a "$OUT/summary.txt" >&2; exit 2 ;;
esac
EAGER=finetune,cwps-soft,cwps-hard
PAPER="--model resnet50 --batch 96 --size 224 --amp bf16 --skip-memory"
DIGITS="--size 32 --skip-memory"
step gpu_check 90 $PY benchmarks/gpu_check.py
bench overhead_paper_bf16 120 $PAPER --warmup 3 --steps 20 --variants $EAGER
bench overhead_digits_compile 240 $DIGITS --warmup 3 --steps 30 \
  --variants $EAGER,finetune+compile,cwps-soft+compile,cwps-hard+compile,cwps-hard-per-layer,step-compose-soft,step-compose-hard,cwps-step-soft,cwps-step-hard
rm -rf "$WORK/train"  # a run directory left from an earlier suite would be resumed, not rerun
step train_amp 180 $PY -m cwps_lightning.train trainer=gpu "data.tasks=[mnist_sketch,mnist_m]" \
  trainer.enable_progress_bar=false "hydra.run.dir=$WORK/train" "paths.cache_dir=$WORK/cache"
if [ -f "$WORK/train/results.json" ]; then
  cp "$WORK/train/results.json" "$OUT/train_amp_results.json"
  bench overhead_digits_job_decisions 90 $DIGITS --warmup 3 --steps 30 \
    --variants $EAGER,traffic-floor --decisions "$WORK/train/results.json"
else
  echo "== overhead_digits_job_decisions: skipped, train_amp wrote no results.json" | tee -a "$OUT/summary.txt"
fi
bench overhead_paper_bf16_compile 300 $PAPER --warmup 3 --steps 10 \
  --variants finetune,finetune+compile,cwps-soft+compile,cwps-hard+compile
bench overhead_digits_cudagraphs 240 $DIGITS --warmup 3 --steps 30 \
  --variants finetune,finetune+compile-ro,cwps-soft+compile-ro,cwps-hard+compile-ro
echo "== total $((SECONDS - START)) s of a $BUDGET s budget" | tee -a "$OUT/summary.txt"
exit $status
