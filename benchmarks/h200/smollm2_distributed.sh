#!/usr/bin/env bash
# 1 GPU vs 2 GPUs (FSDP2), same config and global batch (8 packed rows of 4096 tokens per step:
# batch 8 on one rank, batch 4 on each of two), same data order; loss curves compared afterwards.
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/runs}
TUNE=${TUNE:-tune}
mkdir -p "$O" "$R"
D="--config smollm2_135m dms.final_cr=8 dms.final_step=30 max_steps=30 save_every_n_steps=1000 eval_batches=1"
s=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 150 $TUNE run dms_retrofit $D batch_size=8 output_dir=$R/dist1 > "$O/dist1.log" 2>&1
echo "dist1 rc=$? $(( $(date +%s) - s )) s" >> "$O/times.txt"
s=$(date +%s)
timeout 150 $TUNE run --nproc_per_node 2 dms_retrofit $D batch_size=4 output_dir=$R/dist2 > "$O/dist2.log" 2>&1
echo "dist2 rc=$? $(( $(date +%s) - s )) s" >> "$O/times.txt"
tar czf "$O/dist_logs.tgz" -C "$R" dist1/logs dist2/logs 2>/dev/null
