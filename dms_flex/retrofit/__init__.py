"""The machinery of the retrofit recipe (`recipes/dms_retrofit.py`, `tune run dms_retrofit`), by concept:

- `config_checks`: packaged config names, the config's validation and its one-line error messages
- `step`: `RetrofitStep`, everything a micro-batch computes inside one module call (KD + compression loss)
- `models`: the student and teacher: loading, freezing and quantizing the base, FSDP2 sharding
- `run_record`: the run id, the result-changing settings and data hash each checkpoint records, resume checks
  and the `resume_from=latest` choice (newest intact checkpoint of the run)
- `output_dir`: start-up checks of output_dir, overwrite, what the recipe wrote there, leftovers of interrupted saves
- `checkpointing`: step folders and final/ (atomic Hugging Face folders), the recipe state, RNG states
- `metrics`: kept tokens per layer and KV head, the logged metrics, the kept-fraction heat map
- `memory`: the memory estimate of a quantized-base run and the measured peak
- `memory_fit`: the memory model the recipe logs at start-up (fixed + per-token bytes per variant: fitted
  coefficients where measured, else the analytic prior) and its least-squares fit to benchmark measurements
- `random_init`: benchmark runs: `benchmark=true`, `random_init=true` (hf_repo's architecture, random weights),
  synthetic packed rows
- `timing`: the step-time split (CUDA events / perf_counter) and benchmark.json

These modules are the recipe's: unlike the core of dms_flex they may import torchtune (lazily, where used).
"""
