#!/usr/bin/env bash
# Issue 7's table on the embedded SmolLM2 with its packaged DMS adapter: vanilla vs DMS vs StreamingLLM,
# H2O and TOVA at CR 2, 4, 8 (DMS calibrated to each CR, which it meets to 2 decimals; the baselines run
# at the requested CR), on perplexity/KL, reasoning, needle and variable tracking, plus parallel
# sampling. The baselines' perplexity goes token by token (~70 s per run on the H200, Python-bound), so
# one process per baseline runs side by side (two per GPU), then --merge makes one table and one set of
# plots. Each process rewrites its results.json after every method, so a time-out keeps what finished.
set -u
O=${1:?output folder}
mkdir -p "$O"
. "$(dirname "$0")/table_eval.sh"
# EXTRA: arguments appended to every process (later ones win; split at spaces, so no value may contain one),
# e.g. the long-context run of RESULTS.md 17:
#   EXTRA="--metrics needle,vartrack --lengths 6144,8000" PARALLEL=0 bash benchmarks/h200/smollm2_table.sh OUT
EV="$TABLE_EVAL ${EXTRA:-}"
PAR=""
if [ "${PARALLEL:-4}" != 0 ]; then PAR="--parallel-samples ${PARALLEL:-4}"; fi
CUDA_VISIBLE_DEVICES=0 timeout ${LIMIT:-540} $EV --methods vanilla,dms $PAR --out "$O/dms" > "$O/dms.log" 2>&1 &
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)  # physical GPUs (not MIG lines)
for spec in 0:streaming 1:h2o 1:tova; do
  gpu=$(( ${spec%%:*} % (NGPU > 0 ? NGPU : 1) )); name=${spec#*:}  # one GPU: all four processes share it
  CUDA_VISIBLE_DEVICES=$gpu timeout ${LIMIT:-540} $EV --methods $name --out "$O/$name" > "$O/$name.log" 2>&1 &
done
wait
python3 -m dms_flex.eval --merge "$O"/{dms,streaming,h2o,tova}/results.json --out "$O/table" > "$O/table.log" 2>&1
cat "$O/table.log"
