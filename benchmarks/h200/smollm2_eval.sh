#!/usr/bin/env bash
# Evaluations of the SmolLM2 retrofits of smollm2_retrofits.sh (RESULTS.md section 11), as run on GPU 1
# of the x2 machine (two processes side by side): KL/PPL and reasoning at CR 1/4/8 of both variants
# (issue 4), int8 KV and int8 weights against the quantization-aware retrofits at CR 8 (issue 10), and
# the int8-vs-bf16 cache KL of the all-weights retrofit at its own decisions (issue 6).
# (The partial baseline table of section 12 ran beside them on GPU 0; smollm2_table.sh is the full one.)
set -u
R=${1:?runs folder}
O=${2:?output folder}
mkdir -p "$O"
B=$(python3 -c "from dms_flex.checkpoints import default_model_dir; print(default_model_dir())")
EV="python3 -m dms_flex.eval --device cuda --dtype bfloat16 --ppl-windows 4 --ppl-len 1024 --ppl-prefix 64
    --batch-size 16 --model $B --methods vanilla,dms --metrics ppl,reasoning --reasoning-n 64 --dms-calibrate"
one() {  # name args...
  local n=$1; shift
  timeout 100 $EV "$@" --out "$O/$n" > "$O/$n.log" 2>&1
}
(
  one allw_cr148 --dms-checkpoint "$R/allw/final" --cr 1,4,8
  one allw_int8kv --dms-checkpoint "$R/allw/final" --cr 8 --kv int8
  one qatkv_int8kv --dms-checkpoint "$R/allw_qatkv/final" --cr 8 --kv int8
) &
(
  one adapter_cr148 --dms-checkpoint "$R/adapter/final" --cr 1,4,8
  one adapter_w8 --dms-checkpoint "$R/adapter/final" --cr 8 --weight-quant int8
  one w8base_w8 --dms-checkpoint "$R/adapter_w8/final" --cr 8 --weight-quant int8
  timeout 60 python3 benchmarks/kv_int8_accuracy.py --checkpoint "$R/allw/final" --tokens 2048 \
    --out "$O/kv_int8_allw.json" > "$O/kv_int8.log" 2>&1
) &
wait
