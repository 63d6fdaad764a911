#!/usr/bin/env bash
# 2026-12-02 (third session): issue 16's data runs and the owed GPU suite. The whole GPU suite beside the
# teacher-answered reasoning set's build (both leave the GPU mostly idle), then two students side by side:
# lora_all_cr10_long_code (32a's best recipe with the whole standard library as code: does more data close the
# 0.029 -> 0.039 train/held-out gap?) and lora_all_cr10_long_solved (the same plus many-shot solved reasoning
# conversations in the evaluation's format: does the arithmetic loss at CR ~6 come from the unseen format?), each
# evaluated in the table settings (reasoning) and the (ppl2k). On an H100 only the second trains (the
# pair would not fit the budget). Last, if the chain is young enough: dms-hf with the T+N cache and with per-layer
# capacities, one process each on this machine (32b's -16%). Run by start.sh after stage.sh a, b, final.
export PATH=/tmp/site/bin:$PATH PYTHONPATH=$PYTHONPATH:/tmp/R/recipes DMS_FLEX_TEXT_DIR=/tmp/stage/texts
t0=$(date +%s)
(bash benchmarks/h200/session/gpu_suite.sh > $OUT_DIR/gpu_suite_status.txt 2>&1) &
RUNS="lora_all_cr10_long_code lora_all_cr10_long_solved"
nvidia-smi -L | grep -q H100 && RUNS="lora_all_cr10_long_solved"
echo "runs: $RUNS"
GPU0="" GPU1="$RUNS" LANE1_GPU=0 PACKAGED=0 TABLE=1 TRAIN_LIMIT=${TRAIN_LIMIT:-1050} EVAL_LIMIT=240 \
  TUNE="python3 -m torchtune._cli.tune" bash benchmarks/h200/smollm2_ladder.sh $OUT_DIR/ladder
echo "ladder rc=$? at $(( $(date +%s) - t0 )) s"
for f in $OUT_DIR/ladder/train_*.log; do gzip -kf "$f"; done
mkdir -p /tmp/artifacts && mv $OUT_DIR/ladder/artifact_* /tmp/artifacts/ 2>/dev/null  # keep the tarball small
wait
if [ $(( $(date +%s) - t0 )) -lt ${GEN_BEFORE:-1150} ]; then
  for cap in full layers; do
    timeout 200 python3 benchmarks/bench_generate.py --prompt-len 7000 --batch 16 --new-tokens 128 \
      --text-file /tmp/stage/texts/kjv.txt --systems dms-hf hf-static --dms-capacity $cap \
      --out $OUT_DIR/gen7k_hf_$cap.json > $OUT_DIR/gen7k_hf_$cap.log 2>&1
    echo "gen7k_hf_$cap rc=$? at $(( $(date +%s) - t0 )) s"
  done
fi
