#!/usr/bin/env bash
# Issue 9's full table: forward+backward at T 4K-32K x B 1,4 x Llama-3.2-1B / Llama-3-8B heads x windows
# 256, 512 (SDPA causal: default, FlashAttention-2 and cuDNN backends; flex causal, naive flex DMS, the Triton
# DMS kernel; peak memory of each),
# split over two GPUs (one process per GPU: timings are not shared), then one merged table.
set -u
O=${1:?output folder}
mkdir -p "$O"
A="--batch 1 4 --heads 1b,8b --window 256 512 --reps 5 --warmup 2
   --variants sdpa_causal,sdpa_flash,sdpa_cudnn,flex_causal,flex_dms,triton_dms"
CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT:-560} python3 benchmarks/bench_train_attention_kernel.py --seq 4096 16384 $A \
  --out "$O/train_kernel_a.json" > "$O/train_kernel_a.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout ${LIMIT:-560} python3 benchmarks/bench_train_attention_kernel.py --seq 8192 32768 $A \
  --out "$O/train_kernel_b.json" > "$O/train_kernel_b.log" 2>&1 &
wait
python3 - "$O" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_train_attention_kernel import summary_table
o = sys.argv[1]
rows = []
for part in ("a", "b"):
    try:
        rows += json.load(open(f"{o}/train_kernel_{part}.json"))["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"part {part}: {e!r}")
rows.sort(key=lambda r: (r["heads"], r["B"], r["T"], r["window"]))
json.dump({"rows": rows}, open(f"{o}/train_kernel_all.json", "w"), indent=1)
print(summary_table(rows))
PY
