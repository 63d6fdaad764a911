#!/usr/bin/env bash
# Stage a SmolLM2 session over three calls in a row (a call carries at most 64 MiB with the tree, so the GGUF goes
# in three parts, `split -b 33000000 -d`, one per folder .gguf/a, b, c):
#   1. carry .whl, .gguf/a:        stage.sh         (installs .whl into /tmp/site)
#   2. carry .rg, .gguf/b:         stage.sh         (installs .rg, the reasoning-gym 0.1.25 wheels and their pure
#                                                     dependencies, pycosat built for cp312, into /tmp/site)
#   3. carry .gguf/c, .run:        stage.sh final   (the texts of `python -m dms_flex.eval.data --export`, gzipped
#                                                     in .run/texts; joins the parts, installs the model), then start.sh
# Everything lands under /tmp/stage and /tmp/site, outside the tree.
set -u
mkdir -p /tmp/stage /tmp/site
for part in .gguf/*/*; do [ -f "$part" ] && cp "$part" /tmp/stage/ && echo "staged $part"; done
if [ -d .run/texts ]; then  # kjv.txt.gz, austen.txt.gz
  mkdir -p /tmp/stage/texts && cp .run/texts/* /tmp/stage/texts/ && gunzip -f /tmp/stage/texts/*.gz && echo "staged texts"
fi
if [ ! -f /tmp/site/.ok ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /tmp/stage/pip.log 2>&1
  echo "pip rc=$?"
  rm -f /tmp/site/torchao/_C*.so /tmp/site/torchao/prototype/mxfp8_cuda*.so  # built for another torch/CUDA
  touch /tmp/site/.ok
fi
# the reasoning-gym wheels (only the reasoning runs need them), in whichever call carries .rg
if [ ! -f /tmp/site/.rg_ok ] && ls .rg/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .rg/*.whl >> /tmp/stage/pip.log 2>&1
  echo "pip .rg rc=$?"
  touch /tmp/site/.rg_ok
fi
if [ "${1:-}" = final ]; then
  cat /tmp/stage/smol.gguf.part* > /tmp/stage/smol.gguf && ls -la /tmp/stage/smol.gguf
  # reasoning-gym imports cellpylib, which imports matplotlib: a stand-in where the image has none
  python3 -c "import matplotlib" 2>/dev/null || {
    mkdir -p /tmp/site/matplotlib
    printf '' > /tmp/site/matplotlib/__init__.py
    for m in pyplot animation collections; do printf '' > /tmp/site/matplotlib/$m.py; done
    echo "matplotlib stand-in"; }
  PYTHONPATH=.:/tmp/site bash benchmarks/h200/setup_smollm2.sh /tmp/stage/smol.gguf /tmp/site
  PYTHONPATH=.:/tmp/site python3 -c "import reasoning_gym; print('reasoning-gym', reasoning_gym.__version__)"
fi
ls /tmp/stage
