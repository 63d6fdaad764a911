"""python -m dms_flex.eval: DMS against training-free eviction baselines at equal KV memory.

Methods: ``vanilla`` (dense cache), ``dms`` (the model's learned evictions), and the training-free
policies of `dms_flex.eval.baselines` (``streaming``, ``h2o``, ``tova``) in the same compact cache. Each
compressed method runs at a compression ratio (CR = tokens seen / KV slots kept, docs/design.md, "Compression ratio"):
- DMS's CR is not set directly: it is measured (on the perplexity windows). For a requested CR the
  user passes a retrofit checkpoint (``--dms-checkpoint 8=DIR``), an alpha_offset
  (``--dms-alpha-offset 8=-2``) or a window (``--dms-window 8=64``; ``--dms-window 64`` sets every DMS
  run's window), or asks for ``--dms-calibrate`` (bisection of alpha_offset until the achieved CR hits
  the request: a way to sweep an untrained model's CR). Without any, one DMS run reports whatever CR
  the model's own settings reach.
  ``--dms-checkpoint DIR`` (no CR) runs every DMS run with that one checkpoint (loaded once) instead of
  --model's decisions: with --dms-calibrate its alpha_offset is calibrated per requested CR; with a
  per-CR alpha_offset or window those apply to it; with neither, one run with its own settings.
  ``CR=DIR`` entries take precedence for their CR (that checkpoint's own settings, not calibrated).
- The baselines run at the CR that DMS achieved for the same request (``--no-match-dms-cr``: at the
  requested CR), so a comparison holds KV memory equal.

Quantization ("retrofit under quantization"):
- ``--kv int8``: vanilla and DMS store K/V as the served int8 cache does (one float32 scale per token and
  KV head): the cached paths use ``InferenceState(kv_dtype=torch.int8)``, the teacher-forced perplexity
  and the DMS CR measurement / calibration ``forward_train(kv_int8=True)``, the same round trip (tested
  equal). The baselines' PolicyState has no int8 storage: they stay in the model dtype (recorded).
- ``--weight-quant int8|int4``: torchao weight-only quantization of the evaluated model's linear layers
  (and of every DMS checkpoint loaded); int4 casts the model to bfloat16 first.
- The KL/PPL reference is always the unquantized vanilla model (``--reference DIR``, default --model) in
  its dtype with a full-precision cache, so KL measures the whole error against it. With weight
  quantization and no --reference it is a separate unquantized copy of --model (memory: one more copy).
The setting is printed and stored in results.json ("quantization", and "kv" / "weights" per run).

Metrics (each can be switched off with --metrics):
- ``ppl``: perplexity and KL(vanilla || method) per token on held-out offline text (KJV, Austen,
  Python sources: `dms_flex.eval.data`). Each window of --ppl-len tokens scores the tokens after its
  first --ppl-prefix tokens. vanilla and DMS: teacher-forced ``forward_train(training=False)`` (exact
  DMS masking; identical to the cached path, see tests/test_inference.py), or the cached path with
  --dms-cached. Policies: the cached path, a prefill of the prefix (exact attention, then the budget
  applied), then token by token, so each prediction sees exactly what the policy kept.
- ``reasoning``: reasoning-gym tasks, greedy, scored with the package's own ``score_answer``.
- ``needle`` and ``vartrack``: long-context retrieval built from the offline text (see dms_flex.eval.data).
- ``--parallel-samples N``: the hyper-scaling comparison: N sampled answers per question from each
  compressed method at CR N, majority vote, against 1 greedy vanilla answer: equal KV memory only when
  the generations are much longer than the DMS window (the table prints each run's KV bytes against
  vanilla's and says when they are not equal).

Outputs under --out: results.json, a printed table, <metric>_vs_cr.png per metric, and a kept-fraction
heat map per layer and KV head for each compressed run (kept_<method>_cr<CR>.png); without matplotlib
the plots are skipped and ``--replot results.json`` draws them later elsewhere.

The defaults are sized for a CPU (SmolLM2-135M: three 512-token perplexity windows, 8 problems,
needles at 256 and 512 tokens); the policies' token-by-token perplexity dominates the time.
"""

# Modules: cli (flags, their checks, main), runner (one run: model, data, every method, results.json),
# methods (Method: vanilla, DMS, the baselines; DMS CR measurement and calibration), metrics (perplexity / KL,
# retrieval, reasoning, parallel sampling), report (tables, plots, results.json, --replot, --merge),
# quantization (--kv / --weight-quant, the KL reference), data (texts and tasks), baselines (StreamingLLM, H2O,
# TOVA caches), lm_eval (the lm-evaluation-harness model; imported on its own).

import importlib

# the public names, each from its module, imported on first use: `import dms_flex.eval.baselines` (or
# `python -m dms_flex.eval.data`) does not load the rest
_EXPORTS = {
    "cli": ("METRICS", "main", "parse_args"),
    "methods": (
        "METHODS",
        "Method",
        "CheckpointLoader",
        "build_methods",
        "prepare_dms",
        "measure_dms_cr",
        "calibrate_alpha_offset",
    ),
    "metrics": (
        "perplexity",
        "generate_rows",
        "probe_accuracy",
        "reasoning_accuracy",
        "render_reasoning",
        "majority_vote",
        "parallel_sampling",
    ),
    "report": ("print_table", "print_parallel", "merge", "replot"),
    "runner": ("run",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
