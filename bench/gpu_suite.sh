#!/usr/bin/env bash
# Every GPU measurement of bench/ in one command, for a lent GPU machine with ~10 minutes of time.
#
#   bash bench/gpu_suite.sh                      # from the repository root, on the GPU machine
#   GPU_SUITE_DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/suite bash bench/gpu_suite.sh   # CPU dry run
#
# What it does, each stage under `timeout` and inside one overall budget (GPU_SUITE_SECONDS, 540 s),
# so that the whole run ends before a 10-minute limit even if a stage hangs:
#   0. installs the carried wheels (.whl/: transformers 5.24, trl 1.16, datasets 5.2, peft 0.21 and
#      their missing needs; torch and numpy are the machine's own) into /tmp/site, first on PYTHONPATH;
#      prints the versions it ends up with and nvidia-smi;
#   0b. on CUDA, tests/test_rollout.py and tests/test_forward.py (their GPU-only test included);
#   1. end to end: train.py --stage grpo on the tiny preset for a few steps, then eval.py on it;
#   2. bench/gpu_decode.py: Qwen2.5-VL-3B-size (random bf16 weights) rollout decode, ours vs
#      generate, against the HBM-bandwidth bound;
#   3. bench/grpo_step_vs_trl.py: one full GRPO step setting (num_iterations 1, beta 0.04), ours vs
#      TRL's GRPOTrainer, on the 3B architecture with random weights, bf16, trainers run one after
#      the other (each holds policy + reference + gradients + AdamW moments: ~37.5 GB).
# Everything printed goes to $OUT/suite.log as it happens (a timed-out run still returns what it
# printed). Files under $OUT (at most 8 come back): suite.log, e2e_metrics.jsonl,
# e2e_eval_summary.json, gpu_decode.json, grpo_step_vs_trl.json, grpo_step_trainer_logs.txt.
#
# GPU_SUITE_DEVICE=cpu runs the same stages on the CPU with tiny sizes (the 3B architecture shrunk
# by --config_overrides) and skips the wheel install unless GPU_SUITE_INSTALL=1: a check that the
# script and every flag in it work, not a measurement.

set -u -o pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_SUITE_DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_suite_out}
BUDGET=${GPU_SUITE_SECONDS:-540}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX)
exec > >(tee -a "$OUT/suite.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1  # no network there
export TOKENIZERS_PARALLELISM=false

START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME MAX_SECONDS COMMAND...: run COMMAND under timeout min(MAX_SECONDS, budget left).
stage() {
  local name=$1 want=$2 t begin rc
  shift 2
  t=$(left)
  ((t > want)) && t=$want
  if ((t < 20)); then
    echo "===== SKIPPED $name: only ${t}s of the budget left"
    return 1
  fi
  echo "===== $name (timeout ${t}s, $(left)s of the budget left): $*"
  begin=$(date +%s)
  timeout -k 15 "$t" "$@"
  rc=$?
  echo "===== $name: exit $rc after $(($(date +%s) - begin))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  return $rc
}

echo "gpu_suite: device $DEVICE, python $PY, budget ${BUDGET}s, started $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- 0. wheels and versions ---
if [[ ${GPU_SUITE_INSTALL:-$([[ $DEVICE == cuda ]] && echo 1 || echo 0)} == 1 ]]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    if stage install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "===== the wheels did not install: going on with the machine's own packages"
    fi
  else
    echo "===== no .whl/*.whl here (was .whl carried?): using the installed packages"
  fi
fi
"$PY" - <<'EOF'
import importlib.metadata as m, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "trl", "accelerate", "datasets", "huggingface_hub", "tokenizers",
             "safetensors", "peft", "numpy", "pyarrow", "pandas", "fsspec", "regex", "dill", "multiprocess", "xxhash",
             "pillow", "torchvision"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} MISSING")
import torch, transformers
print("transformers from", transformers.__file__)
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:  # what the TRL comparison needs, imported once here so that a broken one shows up first
    import datasets, trl
    from trl import GRPOConfig, GRPOTrainer
    print("trl (GRPOTrainer, with peft where installed) and datasets import: ok")
except Exception:
    import traceback
    traceback.print_exc()
EOF
if [[ $DEVICE == cuda ]]; then
  nvidia-smi || true
fi

# Sizes: the measurement on the GPU, a few-second check on the CPU.
if [[ $DEVICE == cuda ]]; then
  DTYPE=bfloat16
  E2E=(--per_device_prompts 4 --num_generations 8 --micro_batch_size 8 --max_completion_length 64 --max_steps 4
       --num_examples 64)
  EVAL=(--num_examples 64 --max_completion_length 64)
  DECODE=(--config qwen2.5-vl-3b --num_prompts 4 --group_size 8 --max_new_tokens 128 --image_size 448 --repeats 3)
  # B=1: with B=4 prompts of different lengths TRL's second step had a NaN gradient norm in bf16
  # (docs/benchmarks.md section 5); lr 1e-12: random weights, every computation kept.
  STEP=(--config qwen2.5-vl-3b --num_prompts 1 --group_size 8 --micro_batch_size 8 --max_completion_length 64
        --num_batches 4 --learning_rate 1e-12)
else
  DTYPE=float32
  E2E=(--per_device_prompts 2 --num_generations 2 --micro_batch_size 2 --max_completion_length 8 --max_steps 2
       --num_examples 16)
  EVAL=(--num_examples 16 --max_completion_length 8)
  DECODE=(--config tiny --num_prompts 2 --group_size 2 --max_new_tokens 4 --image_size 112 --repeats 1)
  STEP=(--config qwen2.5-vl-3b --schedule sequential --num_prompts 2 --group_size 2 --micro_batch_size 2
        --max_completion_length 4 --num_batches 2
        --config_overrides "num_hidden_layers=1,intermediate_size=512,vocab_size=1024,vision.depth=1,vision.intermediate_size=256,vision.fullatt_block_indexes=[0]")
fi

# --- 0b. the GPU-only tests (CUDA-graph decoding against the eager loop) ---
if [[ $DEVICE == cuda ]]; then
  stage gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_rollout.py tests/test_forward.py
fi

# --- 1. end to end: train a few GRPO steps, evaluate the result ---
if stage e2e_train 90 "$PY" train.py --stage grpo --model tiny --dataset synthetic --device "$DEVICE" --dtype "$DTYPE" \
  "${E2E[@]}" --output_dir "$WORK/e2e" --overwrite_output_dir --progress_bar false --save_steps 0 --logging_steps 1; then
  cp "$WORK/e2e/metrics.jsonl" "$OUT/e2e_metrics.jsonl" || true
  stage e2e_eval 60 "$PY" eval.py --model "$WORK/e2e" --dataset synthetic --device "$DEVICE" --dtype "$DTYPE" \
    "${EVAL[@]}" --output_dir "$WORK/e2e_eval" --progress_bar false &&
    cp "$WORK/e2e_eval/summary.json" "$OUT/e2e_eval_summary.json"
fi

# --- 2. rollout decode at 3B size vs the bandwidth bound ---
stage gpu_decode 150 "$PY" bench/gpu_decode.py --device "$DEVICE" --dtype "$DTYPE" "${DECODE[@]}" \
  --out "$OUT/gpu_decode.json"

# --- 3. a full GRPO step, ours vs TRL, 3B architecture ---
stage grpo_step_vs_trl 300 "$PY" bench/grpo_step_vs_trl.py --device "$DEVICE" --dtype "$DTYPE" --configs 1:0.04,2:0.04 \
  "${STEP[@]}" --out "$OUT/grpo_step_vs_trl.json" --trainer_logs "$OUT/grpo_step_trainer_logs.txt"

echo "===== done after $(($(date +%s) - START))s; files in \$OUT:"
ls -la "$OUT"
rm -rf "$WORK"
n=$(find "$OUT" -type f | wc -l)
((n <= 8)) || echo "WARNING: $n files under \$OUT, only 8 come back"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # suite.log complete before the machine collects $OUT
