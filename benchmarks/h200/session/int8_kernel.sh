#!/usr/bin/env bash
# RESULTS.md section 29: the int8 decode kernel's GPU tests, its sweeps with every fp16-dot conversion, the
# 8B step (run by start.sh; output under $OUT_DIR)
python3 -m pytest -q -m gpu tests/test_decode_kernel.py tests/test_int8.py -rA -p no:cacheprovider > $OUT_DIR/gpu_tests.log 2>&1
echo "gpu tests rc=$?"
python3 benchmarks/bench_decode_kernel.py --sweep --sweep-full --int8 --f16-cvts asm,asm_pure,arith,arith_fold \
  --sweep-cases llama3-8b:16:32768:8 --out $OUT_DIR/sw_int8.json > $OUT_DIR/sw_int8.log 2>&1
echo "sweep rc=$?"
python3 benchmarks/bench_decode_step.py --preset llama3_8b --batch 16 --ctx 32768 --cache 8 8-int8 8-int8@f \
  --decode-config f=best:$OUT_DIR/sw_int8.json --mode compile-graph --steps 10 --profile \
  --out $OUT_DIR/step8b.json > $OUT_DIR/step8b.log 2>&1
echo "step rc=$?"
