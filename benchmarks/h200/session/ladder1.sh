#!/usr/bin/env bash
# Issue 16's ladder runs on a one-GPU machine (run by start.sh after stage.sh a, b and final): RUNS1 side by side on GPU 0,
# each evaluated as in smollm2_ladder.sh; the whole GPU suite beside them first (SUITE=0 skips it).
export PATH=/tmp/site/bin:$PATH PYTHONPATH=$PYTHONPATH:/tmp/R/recipes DMS_FLEX_TEXT_DIR=/tmp/stage/texts
if [ "${SUITE:-1}" != 0 ]; then
  (timeout 480 python3 -m pytest -q -m gpu tests/ -rA -p no:cacheprovider --durations=15 > $OUT_DIR/gpu_tests.log 2>&1
   echo "gpu tests rc=$?" >> $OUT_DIR/gpu_status.txt) &
fi
GPU0="" GPU1="${RUNS1:-lora_all_cr10_r lora_all_cr10_cos lora_all_cr12_cos}" LANE1_GPU=0 PACKAGED=0 \
  TUNE="python3 -m torchtune._cli.tune" bash benchmarks/h200/smollm2_ladder.sh $OUT_DIR/ladder
echo "ladder rc=$?"
wait
for f in $OUT_DIR/ladder/train_*.log; do gzip -kf "$f"; done
