#!/usr/bin/env bash
# Issue 10: measured GPU memory of the SmolLM2 adapter retrofit on a bf16, int8 and NF4 base, beside the
# recipe's estimate (same rows of 4 x 4096 tokens as smollm2_135m; the code data set, so no teacher-
# answered reasoning set has to be built first). One process at a time on one GPU.
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/runs_mem}
TUNE=${TUNE:-tune}
mkdir -p "$O"
for base in none int8 nf4; do
  timeout 150 $TUNE run dms_retrofit --config smollm2_135m max_steps=20 'dataset=${code}' save_every_n_steps=1000 \
    eval_batches=1 dms.decision=adapter train_adapter_only=true quant.base_weights=$base output_dir=$R/$base \
    > "$O/memory_$base.log" 2>&1
  echo "base=$base rc=$?" >> "$O/memory.txt"
  tr '\r' '\n' < "$O/memory_$base.log" | grep -a "ESTIMATE\|MEASURED" >> "$O/memory.txt"
done
cat "$O/memory.txt"
