#!/usr/bin/env bash
# Issue 15's end-to-end table at B=16 x 7,000-token KJV prompts, every system in one process (run by start.sh
# after stage.sh a, b, final). --out is rewritten after every row, so a cut run keeps its rows.
export PATH=/tmp/site/bin:$PATH DMS_FLEX_TEXT_DIR=/tmp/stage/texts
timeout ${LIMIT:-500} python3 benchmarks/bench_generate.py --prompt-len 7000 --batch 16 --new-tokens 128 \
  --text-file /tmp/stage/texts/kjv.txt --systems dms hf-static dense dms-int8 hf-dynamic dms-hf \
  --out $OUT_DIR/gen7k_all.json > $OUT_DIR/gen7k_all.log 2>&1
echo "gen7k rc=$?"
