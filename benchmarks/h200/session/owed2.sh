#!/usr/bin/env bash
# 2026-12-02 (second session): the GPU test of dms_flex.hf beside the ladder's one run (lora_all_cr10_long: the best
# student's recipe at 200 steps per unit of CR; only the perplexity / KL evaluation), then the owed
# end-to-end cases with the GPU to themselves: B=16 x 7K with per-layer capacities (dms, dms-hf, hf-static), and
# B=64 x 2K of dense and dms-int8 beside transformers static. Run by start.sh after stage.sh a, b, final.
export PATH=/tmp/site/bin:$PATH PYTHONPATH=$PYTHONPATH:/tmp/R/recipes DMS_FLEX_TEXT_DIR=/tmp/stage/texts
(python3 -m pytest -q -m gpu tests/test_hf.py -rA -p no:cacheprovider > $OUT_DIR/gpu_hf.log 2>&1
 echo "gpu_hf rc=$?" >> $OUT_DIR/gpu_status.txt) &
if [ "${LADDER:-1}" != 0 ]; then
  GPU0="" GPU1="lora_all_cr10_long" LANE1_GPU=0 PACKAGED=0 TABLE=0 TRAIN_LIMIT=${TRAIN_LIMIT:-780} \
    TUNE="python3 -m torchtune._cli.tune" bash benchmarks/h200/smollm2_ladder.sh $OUT_DIR/ladder
  echo "ladder rc=$?"
  for f in $OUT_DIR/ladder/train_*.log; do gzip -kf "$f"; done
fi
wait
timeout ${LIMIT7K:-300} python3 benchmarks/bench_generate.py --prompt-len 7000 --batch 16 --new-tokens 128 \
  --text-file /tmp/stage/texts/kjv.txt --systems dms dms-hf hf-static --dms-capacity layers \
  --out $OUT_DIR/gen7k_layers.json > $OUT_DIR/gen7k_layers.log 2>&1
echo "gen7k_layers rc=$?"
timeout ${LIMIT2K:-240} python3 benchmarks/bench_generate.py --prompt-len 2048 --batch 64 --new-tokens 128 \
  --text-file /tmp/stage/texts/kjv.txt --systems dense dms-int8 hf-static \
  --out $OUT_DIR/gen2k_b64.json > $OUT_DIR/gen2k_b64.log 2>&1
echo "gen2k_b64 rc=$?"
