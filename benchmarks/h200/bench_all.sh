#!/usr/bin/env bash
# GPU tests and decode benchmarks. Two GPUs: tests then the step sweep on GPU 1, kernels on GPU 0.
set -u
O=${1:?output folder}
mkdir -p "$O"
(
  CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -p no:logging -p no:cacheprovider --tb=short -m gpu tests/ \
    > "$O/gpu_tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 300 python3 benchmarks/bench_decode_step.py --batch 1 16 64 --ctx 4096 8192 16384 32768 \
    --cache gptfast 1 2 4 8 1-int8 8-int8 --steps 10 --out "$O/decode_step_sweep.json" > "$O/decode_step_sweep.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_decode_kernel.py --int8 --crs 1,8 --no-flex \
  --out "$O/decode_kernel_int8.json" > "$O/decode_kernel_int8.log" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 280 python3 benchmarks/bench_decode_kernel.py --crs 2,4 --flex standard \
  --out "$O/decode_kernel_cr24.json" > "$O/decode_kernel_cr24.log" 2>&1
wait
