#!/usr/bin/env bash
# Issue 10: measured GPU memory of the SmolLM2 adapter retrofit on a bf16, int8 and NF4 base, beside the
# recipe's estimate (same rows of 4 x 4096 tokens as smollm2_135m; the code data set, so no teacher-
# answered reasoning set has to be built first). One process at a time on one GPU.
# Issue 9: then the bf16 run again with compile=true (the whole training step under torch.compile, the
# Triton DMS attention kernel inside it); its per-step losses are compared with the eager bf16 run.
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/runs_mem}
TUNE=${TUNE:-tune}
mkdir -p "$O"
: > "$O/memory.txt"
for run in none int8 nf4 compiled; do
  base=$run; extra=""
  if [ "$run" = compiled ]; then base=none; extra="compile=true"; fi
  timeout ${RUN_LIMIT:-200} $TUNE run dms_retrofit --config smollm2_135m max_steps=20 'dataset=${code}' \
    save_every_n_steps=1000 eval_batches=1 dms.decision=adapter train_adapter_only=true quant.base_weights=$base \
    output_dir=$R/$run $extra > "$O/memory_$run.log" 2>&1
  echo "run=$run base=$base $extra rc=$?" >> "$O/memory.txt"
  tr '\r' '\n' < "$O/memory_$run.log" | grep -a "ESTIMATE\|MEASURED" >> "$O/memory.txt"
  cat "$R/$run"/logs/*.txt > "$O/metrics_$run.txt" 2>/dev/null
done
python3 - "$O" <<'PY' >> "$O/memory.txt"
import re, sys
def losses(name):
    out = {}
    for line in open(f"{sys.argv[1]}/metrics_{name}.txt"):
        m = re.match(r"Step (\d+) \| loss:(\S+)", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out
try:
    e, c = losses("none"), losses("compiled")
    steps = sorted(set(e) & set(c))
    if not steps:
        raise ValueError("no step logged by both runs")
    rel = [abs(c[s] - e[s]) / max(abs(e[s]), 1e-12) for s in steps]
    print(f"compiled vs eager loss over {len(steps)} steps: mean rel. diff {sum(rel) / len(rel):.2%}, max {max(rel):.2%}")
    print("step eager compiled: " + "; ".join(f"{s} {e[s]:.4f} {c[s]:.4f}" for s in steps))
except Exception as exc:
    print(f"compiled vs eager: no comparison ({exc!r})")
PY
cat "$O/memory.txt"
