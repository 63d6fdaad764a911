#!/usr/bin/env bash
# The compiled dms_flex.hf path (a fixed-capacity DMSCache, transformers' auto-compile) on the GPU: its GPU test,
# then bench_generate at B=16 x 7K (dms, hf-static, dms-hf, dms-hf-growable in one process), then the 2K grid of
# issue 15 item 4 (B = 1, 16, 64; every system but dms-hf-growable). Run by start.sh after stage.sh a, b, final.
export PATH=/tmp/site/bin:$PATH DMS_FLEX_TEXT_DIR=/tmp/stage/texts
python3 -m pytest -q -m gpu tests/test_hf.py -rA > $OUT_DIR/gpu_hf.log 2>&1
echo "gpu_hf rc=$?"
timeout ${LIMIT7K:-420} python3 benchmarks/bench_generate.py --prompt-len 7000 --batch 16 --new-tokens 128 \
  --text-file /tmp/stage/texts/kjv.txt --systems dms hf-static dms-hf dms-hf-growable \
  --out $OUT_DIR/gen7k_hf.json > $OUT_DIR/gen7k_hf.log 2>&1
echo "gen7k_hf rc=$?"
timeout ${LIMIT2K:-840} python3 benchmarks/bench_generate.py --prompt-len 2048 --batch 1 16 64 --new-tokens 128 \
  --text-file /tmp/stage/texts/kjv.txt --systems dms hf-static dms-hf dense dms-int8 hf-dynamic \
  --out $OUT_DIR/gen2k_grid.json > $OUT_DIR/gen2k_grid.log 2>&1
echo "gen2k_grid rc=$?"
