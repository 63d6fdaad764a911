#!/usr/bin/env bash
# Longer adapter retrofits of SmolLM2-135M-Instruct: ~100 steps per unit of CR (docs/design.md, "Losses and schedule"; the
# packaged adapter had 26), on the code data set (no teacher-answered reasoning set to build first),
# compiled, one per GPU at two learning rates. Each is then evaluated with the table's settings (vanilla
# and DMS only: the training-free baselines of smollm2_table.sh do not depend on the retrofit).
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/runs_long}
TUNE=${TUNE:-tune}
STEPS=${STEPS:-900}
RAMP=${RAMP:-700}
mkdir -p "$O"
: > "$O/status.txt"
. "$(dirname "$0")/table_eval.sh"
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
for spec in 0:1e-4 1:3e-4; do
  gpu=$(( ${spec%%:*} % (NGPU > 0 ? NGPU : 1) )); lr=${spec#*:}  # one GPU: both share it
  (
    CUDA_VISIBLE_DEVICES=$gpu timeout ${TRAIN_LIMIT:-330} $TUNE run dms_retrofit --config smollm2_135m 'dataset=${code}' \
      compile=true dms.decision=adapter train_adapter_only=true max_steps=$STEPS dms.final_step=$RAMP optimizer.lr=$lr \
      save_every_n_steps=100000 output_dir=$R/lr$lr > "$O/retrofit_lr$lr.log" 2>&1
    echo "retrofit lr $lr rc=$?" >> "$O/status.txt"
    cat "$R/lr$lr"/logs/*.txt > "$O/metrics_lr$lr.txt" 2>/dev/null
    CUDA_VISIBLE_DEVICES=$gpu timeout ${EVAL_LIMIT:-200} $TABLE_EVAL --methods vanilla,dms --dms-checkpoint "$R/lr$lr/final" \
      --out "$O/eval_lr$lr" > "$O/eval_lr$lr.log" 2>&1
    echo "eval lr $lr rc=$?" >> "$O/status.txt"
  ) &
done
wait
cat "$O/status.txt"
