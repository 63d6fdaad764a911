#!/usr/bin/env bash
# SmolLM2-135M-Instruct retrofits to CR 8 (the smollm2_135m config as packaged) on two GPUs, two runs
# per GPU side by side: all weights (borrowed neuron), adapter only, all weights through the int8 KV
# round trip, adapter only on an int8-weight base.
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/runs}
mkdir -p "$O" "$R"
TUNE=${TUNE:-tune}   # `python3 -m torchtune._cli.tune` where the tune script is not on PATH
COMMON="--config smollm2_135m save_every_n_steps=1000"
t0=$(date +%s)
# the teacher-answered reasoning set, once (the runs would wait on its lock anyway)
CUDA_VISIBLE_DEVICES=0 python3 -m dms_flex.data reasoning --num-problems 1000 --problems-per-conversation 8 \
  --max-new-tokens 384 --batch-size 64 > "$O/reasoning_set.log" 2>&1
echo "reasoning set: $(( $(date +%s) - t0 )) s" >> "$O/times.txt"
run() {  # name gpu overrides...
  local name=$1 gpu=$2; shift 2
  local s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout ${LIMIT:-330} $TUNE run dms_retrofit $COMMON output_dir=$R/$name "$@" \
    > "$O/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s" >> "$O/times.txt"
}
run allw 0 &
run adapter 0 dms.decision=adapter train_adapter_only=true &
run allw_qatkv 1 quant.kv_int8=true &
run adapter_w8 1 dms.decision=adapter train_adapter_only=true quant.base_weights=int8 &
wait
# the DMS parameters of the adapter run (small), and every run's metric logs
python3 - "$R" "$O" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from dms_flex.checkpoints import is_extra_key
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
src = runs / "adapter" / "final"
if (src / "config.json").is_file():
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update({k: v for k, v in load_file(str(f)).items() if is_extra_key(k)})
    save_file(sd, str(out / "adapter_dms.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (out / "adapter_dms_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k.startswith("dms_")}, indent=1))
    print("adapter params:", {k: tuple(v.shape) for k, v in list(sd.items())[:3]}, len(sd))
PY
tar czf "$O/logs.tgz" -C "$R" $(cd "$R" && ls -d */logs 2>/dev/null) 2>/dev/null
ls "$R"/*/ >> "$O/times.txt"
