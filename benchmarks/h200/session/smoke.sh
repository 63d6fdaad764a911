#!/usr/bin/env bash
# A quick check of the session scripts and the wheels: imports, the decode kernel's GPU int8 and bf16 cases
python3 -c "import torch, torchtune, torchao, dms_flex; print('imports ok', torch.__version__, torchtune.__version__)"
python3 -m pytest -q -m gpu tests/test_decode_kernel.py -k "int8 or realistic" -p no:cacheprovider > $OUT_DIR/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -1 $OUT_DIR/gpu_tests.log
