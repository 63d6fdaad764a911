#!/usr/bin/env bash
# Issue-15 speed check on one H200: GPU tests of the new prefill/decode-update kernels, the one-layer
# prefill breakdown, and the decode step (SmolLM2 and Llama-3-8B shapes, random weights).
# Usage: bash benchmarks/h200/speed_check.sh OUT [quick]
set -uo pipefail
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_decode_kernel.py -x 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_prefill_layer.py --shapes 16x7000 1x32768 --out "$OUT/prefill_layer.json" 2>&1 | tee "$OUT/prefill_layer.log"
python3 benchmarks/bench_decode_step.py --preset smollm2 --batch 16 --ctx 7000 --cache gptfast 1 8 8-int8 \
  --mode graph --out "$OUT/step_smollm2_graph.json" 2>&1 | tee "$OUT/step_smollm2_graph.log"
python3 benchmarks/bench_decode_step.py --preset smollm2 --batch 16 --ctx 7000 --cache 1 8 8-int8 \
  --mode compile --profile --out "$OUT/step_smollm2_compile.json" 2>&1 | tee "$OUT/step_smollm2_compile.log"
python3 benchmarks/bench_decode_step.py --preset llama3_8b --batch 16 --ctx 32768 --cache gptfast 1 8 8-int8 \
  --mode graph --out "$OUT/step_8b_graph.json" 2>&1 | tee "$OUT/step_8b_graph.log"
