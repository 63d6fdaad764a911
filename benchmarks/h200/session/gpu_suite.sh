#!/usr/bin/env bash
# The whole GPU suite (run by start.sh; output under $OUT_DIR); the TP=2 test runs where two GPUs are lent
timeout 480 python3 -m pytest -q -m gpu tests/ -rA -p no:cacheprovider --durations=15 > $OUT_DIR/gpu_tests.log 2>&1
echo "gpu tests rc=$?"
tail -3 $OUT_DIR/gpu_tests.log
