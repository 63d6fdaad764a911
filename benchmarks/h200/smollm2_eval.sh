#!/usr/bin/env bash
# Evaluations of the SmolLM2 retrofits (smollm2_retrofits.sh) on two GPUs side by side.
# GPU 0: the DMS vs baselines table (issue 7) on the adapter retrofit, CR 2/4/8 by calibration.
# GPU 1: KL/PPL at CR 1/4/8 of both variants (issue 4), int8 KV and int8 weights against
#        quantization-aware retrofits (issue 10), the int8-vs-bf16 cache KL at CR 8 (issue 6).
set -u
R=${1:?runs folder}
O=${2:?output folder}
mkdir -p "$O"
BASE=$(python3 -c "from dms_flex.smollm2 import default_model_dir; print(default_model_dir())")
EV="python3 -m dms_flex.eval --device cuda --dtype bfloat16 --ppl-windows 4 --ppl-len 1024 --ppl-prefix 64 --batch-size 16"
(
  CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT0:-540} $EV --model "$BASE" --dms-checkpoint "$R/adapter/final" --dms-calibrate \
    --cr 2,4,8 --reasoning-n 64 --parallel-samples 4 --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --trials 2 \
    --out "$O/table" > "$O/table.log" 2>&1
  echo "table rc=$?" >> "$O/rc.txt"
) &
export CUDA_VISIBLE_DEVICES=1
Q="--methods vanilla,dms --metrics ppl,reasoning --reasoning-n 64"
one() {  # name args...
  local name=$1; shift
  timeout 150 $EV "$@" --out "$O/$name" > "$O/$name.log" 2>&1
  echo "$name rc=$?" >> "$O/rc.txt"
}
one allw_cr148 $Q --model "$BASE" --dms-checkpoint "$R/allw/final" --dms-calibrate --cr 1,4,8
one adapter_cr148 $Q --model "$BASE" --dms-checkpoint "$R/adapter/final" --dms-calibrate --cr 1,4,8
one allw_int8kv $Q --model "$BASE" --dms-checkpoint "$R/allw/final" --dms-calibrate --cr 8 --kv int8
one qatkv_int8kv $Q --model "$BASE" --dms-checkpoint "$R/allw_qatkv/final" --dms-calibrate --cr 8 --kv int8
one qatkv_bf16kv $Q --model "$BASE" --dms-checkpoint "$R/allw_qatkv/final" --dms-calibrate --cr 8
one adapter_w8 $Q --model "$BASE" --dms-checkpoint "$R/adapter/final" --dms-calibrate --cr 8 --weight-quant int8
one w8base_w8 $Q --model "$BASE" --dms-checkpoint "$R/adapter_w8/final" --dms-calibrate --cr 8 --weight-quant int8
timeout 60 python3 benchmarks/kv_int8_accuracy.py --checkpoint "$R/allw/final" --tokens 2048 \
  --out "$O/kv_int8_allw.json" > "$O/kv_int8_allw.log" 2>&1
wait
