#!/usr/bin/env bash
# Start a chain of GPU jobs detached on the lent machine, so that it outlives the call that starts it.
#   bash benchmarks/h200/session/start.sh CHAIN.sh      (CHAIN.sh: a path in this tree; carry ".whl")
# Copies the tree to /tmp/R, installs the wheels of ../../../.whl (see ../README.md) into /tmp/site once per
# machine, runs CHAIN.sh from /tmp/R with PYTHONPATH=/tmp/R:/tmp/site, its output under /tmp/O, then touches
# /tmp/O/DONE. Collect with collect.sh in the next call, at once: a machine is given back ~30 s after a call
# returns, running jobs and all.
set -u
chain=${1:?usage: start.sh CHAIN.sh}
[ -f "$chain" ] || { echo "no such chain: $chain" >&2; exit 2; }
rm -rf /tmp/O /tmp/R; mkdir -p /tmp/O /tmp/R
cp -r . /tmp/R/ 2>/dev/null
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/R/.whl/*.whl > /tmp/O/pip.log 2>&1
  rm -f /tmp/site/torchao/_C*.so /tmp/site/torchao/prototype/mxfp8_cuda*.so  # built for another torch/CUDA
  touch /tmp/site/.ok
fi
cat > /tmp/R/.chain_env.sh <<'EOC'
cd /tmp/R
export PYTHONPATH=/tmp/R:/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/ind_cache OUT_DIR=/tmp/O
EOC
setsid nohup bash -c "source /tmp/R/.chain_env.sh; { date; nvidia-smi -L; bash '$chain'; echo \"chain rc=\$?\"; date; } > /tmp/O/chain.log 2>&1; touch /tmp/O/DONE" > /dev/null 2>&1 < /dev/null &
echo "started $chain"
