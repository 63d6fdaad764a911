#!/usr/bin/env bash
# Issue 16's SmolLM2 retrofit ladder: compiled retrofits of the embedded SmolLM2-135M-Instruct on one data mix
# (teacher-answered reasoning conversations + Python sources + prose without the evaluation's windows:
# docs/design.md, "Retrofit data"), 100 steps per unit of CR (CR 1 -> 8 over 700 steps, then 100 at CR 8). The runs:
#   adapter       the DMS adapter alone on the frozen base (the packaged adapter's variant)
#   lora_attn     adapter + torchtune LoRA (rank 8) on q/k/v/output projections (smollm2_135m_lora)
#   lora_all      adapter + LoRA on the attention and the MLP (w1, w2, w3)
#   borrowed      all weights, the borrowed neuron, ZEROING steps of gradual zeroing first, lr BORROWED_LR
#   lora_all_long lora_all at 200 steps per unit of CR (2 x STEPS, 2 x RAMP)
#   lora_all_cr10 lora_all trained on to CR 10 (100 steps per unit), used at CR 8
#   lora_all_cr10_r  the same with the reasoning conversations four times over (dataset_repeat=[4,1,1])
#   lora_all_cr10_cos  lora_all_cr10 with the lr decaying over the run (torchtune's cosine schedule)
#   lora_all_cr12_cos  the same trained on to CR 12 (CR 1 -> 12 at 100 steps per unit, then 200 steps at CR 12)
#   lora_all_r16  lora_all with LoRA rank 16 (alpha 32)
#   lora_all_cr10_long  lora_all_cr10 at 200 steps per unit of CR (CR 1 -> 10 over 1,800 steps, then 400 at CR 10)
#   lora_all_cr10_long_code  the same with the whole standard library as its code source (code.modules=all: ~10 MB
#                 of source against the config's 20 modules; the evaluation's held-out files are always left out)
#   lora_all_cr10_long_solved  the same plus many-shot conversations of solved reasoning-gym problems in the
#                 evaluation's prompt format (dms_flex.data.solved_reasoning_dataset: six tasks at their default
#                 difficulty, questions disjoint from the evaluation's; ~1.2M tokens)
# (lora_all_cr10: CR 1 -> 10 at 100 steps per unit, then 2 x (STEPS - RAMP) steps at CR 10.)
# GPU0 / GPU1 name the runs of each GPU (default: adapter borrowed / lora_attn lora_all; each name once); the runs
# of one GPU train side by side (TRAIN_LIMIT s each, default 900: two long runs side by side need it), each then
# evaluated on that GPU. LANE0_GPU / LANE1_GPU: the device index of each lane (default 0 / 1; on a one-GPU machine
# LANE1_GPU=0 GPU0="" runs GPU1's list on the one GPU). WAIT0=FILE: GPU 0's runs start once FILE exists (GPU 0 busy with other work until then;
# WAIT0_LIMIT s at most, default 3600). Each run is evaluated twice: the table's settings (table_eval.sh:
# perplexity/KL on 4 x 1,024-token windows, reasoning, needle, variable tracking at CR 2/4/8; TABLE=0 skips it),
# and the issue's perplexity target (8 held-out windows of 2,048 tokens per prose/code source at CR 4 and 8). The
# packaged adapter is evaluated too, on PACKAGED_GPU (default 0; PACKAGED=0 skips it). The small artifacts are
# exported. The exit status is 1 when any training, evaluation or export failed (status.txt says which).
#   bash benchmarks/h200/smollm2_ladder.sh OUT        (after setup_smollm2.sh)
set -u
O=${1:?output folder}
R=${RUNS:-/tmp/ladder}
TUNE=${TUNE:-tune}
STEPS=${STEPS:-800}
RAMP=${RAMP:-700}
ZEROING=${ZEROING:-200}
BORROWED_LR=${BORROWED_LR:-3e-5}
mkdir -p "$O" "$R"
: > "$O/status.txt"
. "$(dirname "$0")/table_eval.sh"
PPL2K="python3 -m dms_flex.eval --device cuda --dtype bfloat16 --metrics ppl --ppl-windows 8 --ppl-len 2048
  --ppl-prefix 64 --batch-size 8 --dms-calibrate --cr 4,8"
# EXTRA: more overrides for every run, split at spaces (e.g. EXTRA="dataset_repeat=[4,1,1]": the reasoning
# conversations four times over)
COMMON=(compile=true 'dataset=["${reasoning}","${code}","${prose}"]' max_steps=$STEPS dms.final_step=$RAMP
  save_every_n_steps=100000 ${EXTRA:-})
train() {  # name gpu config overrides...
  local name=$1 gpu=$2 cfg=$3; shift 3
  local s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout ${TRAIN_LIMIT:-900} $TUNE run dms_retrofit --config $cfg "${COMMON[@]}" \
    output_dir=$R/$name "$@" > "$O/train_$name.log" 2>&1
  echo "train $name rc=$? $(( $(date +%s) - s )) s" >> "$O/status.txt"
  cat "$R/$name"/logs/*.txt > "$O/metrics_$name.txt" 2>/dev/null
}
evaluate() {  # name gpu [--dms-checkpoint DIR]
  local name=$1 gpu=$2; shift 2
  local s=$(date +%s)
  if [ "${TABLE:-1}" != 0 ]; then
    CUDA_VISIBLE_DEVICES=$gpu timeout ${EVAL_LIMIT:-300} $TABLE_EVAL --methods vanilla,dms "$@" --out "$O/table_$name" \
      > "$O/table_$name.log" 2>&1
    echo "table $name rc=$? $(( $(date +%s) - s )) s" >> "$O/status.txt"
  fi
  s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout ${EVAL_LIMIT:-300} $PPL2K --methods vanilla,dms "$@" --out "$O/ppl2k_$name" \
    > "$O/ppl2k_$name.log" 2>&1
  echo "ppl2k $name rc=$? $(( $(date +%s) - s )) s" >> "$O/status.txt"
}
recipe() {  # name -> config and overrides (no spaces inside an override)
  local all='lora.modules=[q_proj,k_proj,v_proj,output_proj,w1,w2,w3]'
  local cosine="lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
    lr_scheduler.num_warmup_steps=0"
  case $1 in
    adapter) echo smollm2_135m dms.decision=adapter train_adapter_only=true ;;
    borrowed) echo smollm2_135m zeroing_steps=$ZEROING optimizer.lr=$BORROWED_LR ;;
    lora_attn) echo smollm2_135m_lora ;;
    lora_all) echo smollm2_135m_lora $all ;;
    lora_all_long) echo smollm2_135m_lora $all max_steps=$((2 * STEPS)) dms.final_step=$((2 * RAMP)) ;;
    lora_all_cr10) echo smollm2_135m_lora $all dms.final_cr=10 max_steps=$((STEPS + 3 * (STEPS - RAMP))) \
      dms.final_step=$((RAMP + 2 * (STEPS - RAMP))) ;;
    lora_all_cr10_long) echo smollm2_135m_lora $all dms.final_cr=10 max_steps=$((2 * (STEPS + 3 * (STEPS - RAMP)))) \
      dms.final_step=$((2 * (RAMP + 2 * (STEPS - RAMP)))) ;;
    lora_all_cr10_long_code) echo $(recipe lora_all_cr10_long) code.modules=all ;;
    lora_all_cr10_long_solved) echo $(recipe lora_all_cr10_long_code) 'dataset=["${reasoning}","${code}","${prose}","${solved}"]' ;;
    lora_all_cr10_r) echo $(recipe lora_all_cr10) 'dataset_repeat=[4,1,1]' ;;
    lora_all_cr10_cos) echo $(recipe lora_all_cr10) $cosine ;;
    lora_all_cr12_cos) echo smollm2_135m_lora $all dms.final_cr=12 max_steps=$((STEPS + 5 * (STEPS - RAMP))) \
      dms.final_step=$((RAMP + 4 * (STEPS - RAMP))) $cosine ;;
    lora_all_r16) echo smollm2_135m_lora $all lora.rank=16 lora.alpha=32 ;;
    *) echo "unknown run '$1' (adapter borrowed lora_attn lora_all lora_all_long lora_all_cr10 lora_all_cr10_r lora_all_cr10_cos
      lora_all_cr12_cos lora_all_r16 lora_all_cr10_long
      lora_all_cr10_long_code lora_all_cr10_long_solved)" >&2
      return 1 ;;
  esac
}
lane() {  # gpu runs...: train side by side on the GPU, then evaluate each
  local gpu=$1; shift
  local name words
  for name in "$@"; do
    read -r -a words <<< "$(recipe $name)"  # split at spaces, no globbing of the [..] overrides
    train $name $gpu "${words[@]}" &
  done
  wait
  for name in "$@"; do evaluate $name $gpu --dms-checkpoint $R/$name/final & done
  wait
}
GPU0=${GPU0-adapter borrowed}
GPU1=${GPU1-lora_attn lora_all}
for name in $GPU0 $GPU1; do recipe $name > /dev/null || exit 2; done
dup=$(printf '%s\n' $GPU0 $GPU1 | sort | uniq -d)
[ -n "$dup" ] && { echo "run(s) named twice in GPU0/GPU1: $dup (each trains into \$RUNS/NAME)" >&2; exit 2; }
t0=$(date +%s)
[ "${PACKAGED:-1}" != 0 ] && evaluate packaged ${PACKAGED_GPU:-0} &
# the teacher-answered reasoning set of the config (a no-op when it is cached): 125 conversations in one batch
CUDA_VISIBLE_DEVICES=${LANE1_GPU:-1} python3 -m dms_flex.data reasoning --num-problems 1000 --problems-per-conversation 8 \
  --max-new-tokens 384 --batch-size 128 > "$O/reasoning_set.log" 2>&1
echo "reasoning set rc=$? $(( $(date +%s) - t0 )) s" >> "$O/status.txt"
(
  w0=$(date +%s)
  while [ -n "${WAIT0:-}" ] && [ ! -e "$WAIT0" ]; do
    if [ $(( $(date +%s) - w0 )) -gt ${WAIT0_LIMIT:-3600} ]; then
      echo "GPU 0 lane: $WAIT0 did not appear in ${WAIT0_LIMIT:-3600} s; its runs were not started" >> "$O/status.txt"
      exit 0
    fi
    sleep 5
  done
  lane ${LANE0_GPU:-0} $GPU0
) &
lane ${LANE1_GPU:-1} $GPU1 &
wait
echo "training and evaluation wall $(( $(date +%s) - t0 )) s" >> "$O/status.txt"
BASE=$(python3 -m dms_flex.checkpoints embedded 2>/dev/null)
for name in $GPU0 $GPU1; do
  [ "$name" = borrowed ] && continue  # all weights: no small artifact
  python3 -m dms_flex.checkpoints export-adapter "$R/$name/final" "$O/artifact_$name" --base "$BASE" \
    > "$O/export_$name.log" 2>&1
  echo "export $name rc=$?" >> "$O/status.txt"
done
echo "all $(( $(date +%s) - t0 )) s" >> "$O/status.txt"
cat "$O/status.txt"
! grep -q "rc=[1-9]\|not started" "$O/status.txt"
