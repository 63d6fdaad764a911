#!/usr/bin/env bash
# Section 15's table at equal KV memory per metric (issue 16 items 4-5): the embedded SmolLM2 with its packaged DMS
# adapter against StreamingLLM, H2O and TOVA. For each requested CR one process calibrates DMS (alpha_offset, on
# the perplexity windows) and evaluates it on every metric; then each baseline runs in its own process with
# --match-dms, so every metric runs at the CR DMS reached on that metric's own inputs (tokens seen / KV slots
# held: equal KV bytes). Vanilla runs beside them. --merge makes one table (table/table.md: each cell with its
# CR and KV KiB per sequence, a dagger where a cell is more than 5% away from DMS's bytes) and the plots. Each
# process rewrites its results.json after every method, so a time-out keeps what finished.
#   CRS="4 8" (default) LIMIT=seconds per process (default 270) bash benchmarks/h200/smollm2_table.sh OUT
# EXTRA: arguments appended to every process (later ones win; split at spaces, so no value may contain one),
# e.g. a smoke run: EXTRA="--device cpu --dtype float32 --reasoning-n 2" ...
set -u
O=${1:?output folder}
mkdir -p "$O"
. "$(dirname "$0")/table_eval.sh"
EV="$TABLE_EVAL ${EXTRA:-}"
L=${LIMIT:-270}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # up to 10 processes side by side; each is bound by Python, not CPU math
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)  # physical GPUs (not MIG lines)
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
CUDA_VISIBLE_DEVICES=0 timeout $L $EV --methods vanilla --out "$O/vanilla" > "$O/vanilla.log" 2>&1 &
i=0
for cr in ${CRS:-4 8}; do
  gpu=$(( i % NGPU )); i=$(( i + 1 ))
  (
    CUDA_VISIBLE_DEVICES=$gpu timeout $L $EV --methods dms --cr "$cr" --out "$O/dms_cr$cr" > "$O/dms_cr$cr.log" 2>&1
    for name in streaming h2o tova; do
      CUDA_VISIBLE_DEVICES=$gpu timeout $L $EV --methods $name --cr "$cr" --match-dms "$O/dms_cr$cr/results.json" \
        --out "$O/${name}_cr$cr" > "$O/${name}_cr$cr.log" 2>&1 &
    done
    wait
  ) &
done
wait
FILES="$O/vanilla/results.json"
for cr in ${CRS:-4 8}; do FILES="$FILES $O/dms_cr$cr/results.json"; done
for name in streaming h2o tova; do for cr in ${CRS:-4 8}; do FILES="$FILES $O/${name}_cr$cr/results.json"; done; done
python3 -m dms_flex.eval --merge $FILES --out "$O/table" > "$O/table.log" 2>&1
cat "$O/table.log"
grep -h "Error\|error:" "$O"/*.log | head -5
