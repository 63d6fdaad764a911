"""python -m dms_flex.eval: DMS against training-free eviction baselines at equal KV memory.

Methods: ``vanilla`` (dense cache), ``dms`` (the model's learned evictions), and the training-free
policies of `dms_flex.baselines` (``streaming``, ``h2o``, ``tova``) in the same compact cache. Each
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
  Python sources: `dms_flex.eval_data`). Each window of --ppl-len tokens scores the tokens after its
  first --ppl-prefix tokens. vanilla and DMS: teacher-forced ``forward_train(training=False)`` (exact
  DMS masking; identical to the cached path, see tests/test_inference.py), or the cached path with
  --dms-cached. Policies: the cached path, a prefill of the prefix (exact attention, then the budget
  applied), then token by token, so each prediction sees exactly what the policy kept.
- ``reasoning``: reasoning-gym tasks, greedy, scored with the package's own ``score_answer``.
- ``needle`` and ``vartrack``: long-context retrieval built from the offline text (see eval_data).
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

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import baselines as bl
from . import eval_data, generation, quant, stats
from . import torchtune_model as tm
from .config import DMSConfig
from .generation import SamplingConfig

METHODS = ("vanilla", "dms") + bl.POLICIES
METRICS = ("ppl", "reasoning", "needle", "vartrack")
# full-sequence forwards (teacher-forced perplexity, DMS CR measurement) use the dense masked-SDPA
# reference: exact, and no FlexAttention compile per new batch shape; --attention flex switches
ATTENTION_BACKEND = {"name": "dense"}
DEFAULT_REASONING_TASKS = ("basic_arithmetic",)
# small integer sums: the 135M default model scores well above chance on them
DEFAULT_TASK_KWARGS = {"basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                                                operators=("+",), allow_negation=False, allow_parentheses=False)}


# ============================================================================ methods
@dataclass
class Method:
    """One way of running the model: its cache, its CR and where its decisions come from."""
    name: str  # one of METHODS
    model: nn.Module
    cr: Optional[float] = None  # policies: the CR they run at; dms: the achieved CR once measured
    requested_cr: Optional[float] = None
    dms_config: Optional[DMSConfig] = None  # dms: the settings to run with
    setting: str = ""  # dms: where the decisions come from (printed)
    policy_kw: Dict[str, Any] = field(default_factory=dict)
    # KV storage of the cached paths and of the teacher-forced forward: int8 (one scale per token and KV
    # head, as `InferenceState(kv_dtype=torch.int8)` stores it) for vanilla and dms; the policies'
    # PolicyState has no int8 storage, so a policy ignores it (it keeps K/V in the model dtype)
    kv_int8: bool = False
    # dms from a checkpoint (--dms-checkpoint): its folder, and the DMSConfig fields replaced after it is
    # loaded (per-CR window, alpha_offset); `prepare_dms` sets model and dms_config
    checkpoint: Optional[str] = None
    dms_overrides: Dict[str, Any] = field(default_factory=dict)
    calibrate: bool = False  # dms: bisect alpha_offset until the measured CR meets requested_cr

    @property
    def int8_kv(self) -> bool:
        """Whether this method's K/V really go through int8 (policies never do)."""
        return self.kv_int8 and self.name in ("vanilla", "dms")

    @property
    def compressed(self) -> bool:
        return self.name != "vanilla"

    @property
    def label(self) -> str:
        if self.name == "vanilla":
            return "vanilla"
        cr = f"{self.cr:.2f}x" if self.cr is not None else "?"
        return f"{self.name}@{cr}"

    def _activate(self) -> None:
        if self.dms_config is not None:
            self.model.dms_config = self.dms_config

    def policy(self) -> bl.EvictionPolicy:
        return bl.EvictionPolicy(self.name, float(self.cr), **self.policy_kw)

    def new_state(self, batch_size: int, max_seq_len: int):
        self._activate()
        if self.name in bl.POLICIES:
            return bl.PolicyState(self.model, batch_size, self.policy(), max_seq_len=max_seq_len)
        return tm.InferenceState(self.model, batch_size, max_seq_len=max_seq_len, eviction=self.name == "dms",
                                 kv_dtype=torch.int8 if self.int8_kv else None)

    def prefill(self, tokens, state, lengths=None) -> torch.Tensor:
        self._activate()
        if isinstance(state, bl.PolicyState):
            return bl.prefill_with_policy(self.model, tokens, state, lengths)
        return tm.prefill(self.model, tokens, state, lengths)

    def step(self, token, state) -> torch.Tensor:
        self._activate()
        if isinstance(state, bl.PolicyState):
            return bl.decode_step_with_policy(self.model, token, state)
        with torch.no_grad():
            return tm.decode_step(self.model, token, state)

    def teacher_forced(self, tokens):
        """Full-sequence forward (vanilla, dms): (logits (B, T, V), evicted per layer or [])."""
        self._activate()
        out = tm.forward_train(self.model, tokens, eviction=self.name == "dms", training=False,
                               backend=ATTENTION_BACKEND["name"], kv_int8=self.int8_kv)
        return tm.logits_of(self.model, out.hidden), out.evicted


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# ============================================================================ perplexity and KL
@torch.no_grad()
def perplexity(method: Method, windows: torch.Tensor, vanilla: nn.Module, *, prefix: int = 32,
               batch_size: int = 4, cached: bool = False) -> Dict[str, Any]:
    """NLL, perplexity and KL(vanilla || method) per token over windows (N, T), scoring the tokens
    at positions prefix..T-1. Returns the numbers plus the kept-fraction report.

    `vanilla` is the KL reference: always run dense, in its own dtype and weights, with K/V in full
    precision (never int8), so the KL is the method's whole error, quantization included."""
    N, T = windows.shape
    if not (1 <= prefix < T):
        raise ValueError(f"prefix={prefix} must be in [1, {T - 1}]")
    dev = _device_of(method.model)
    teacher = method.name in ("vanilla", "dms") and not cached
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    kept: List[List[torch.Tensor]] = []  # per batch: per layer (B, H)
    window = method.dms_config.effective_window if method.dms_config is not None else None
    t0 = time.perf_counter()
    for i in range(0, N, batch_size):
        x = windows[i: i + batch_size].to(dev)
        B = x.shape[0]
        # the last token is only a target: the forwards read x[:, :-1], as the cached path does
        ref = tm.logits_of(vanilla, tm.forward_train(vanilla, x[:, :-1], eviction=False, training=False,
                                                     backend=ATTENTION_BACKEND["name"]).hidden)
        ref = F.log_softmax(ref[:, prefix - 1:].float(), dim=-1)
        if teacher:
            logits, evicted = method.teacher_forced(x[:, :-1])
            logits = logits[:, prefix - 1:]
            if method.name == "dms":
                kept.append([stats.kept_fraction(ev, window) for ev in evicted])
            else:
                kept.append([torch.ones(B, 1)])
        else:
            state = method.new_state(B, T)
            steps = [method.prefill(x[:, :prefix], state)]
            for t in range(prefix, T - 1):
                steps.append(method.step(x[:, t: t + 1], state))
            logits = torch.stack(steps, dim=1)
            seen = state.next_pos.clamp_min(1)[:, None].float()
            kept.append([c.length.float() / seen for c in state.caches])
        lp = F.log_softmax(logits.float(), dim=-1)
        target = x[:, prefix:]
        nll_sum += float(-lp.gather(-1, target[..., None]).sum())
        kl_sum += float((ref.exp() * (ref - lp)).sum())
        count += target.numel()
    report = stats.compression_report([torch.cat([k[layer].cpu() for k in kept]) for layer in range(len(kept[0]))])
    nll = nll_sum / count
    return {"ppl": math.exp(nll), "nll": nll, "kl": kl_sum / count, "tokens": count, "cr": report.ratio,
            "path": "teacher-forced" if teacher else f"cached (prefill {prefix}, then token by token)",
            "kept_per_layer_head": [[round(float(v), 4) for v in row] for row in report.per_layer_head],
            "seconds": time.perf_counter() - t0, "report": report}


def measure_dms_cr(method: Method, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Achieved CR of a DMS method on the perplexity windows: kept fraction once each window's
    second-to-last token is read (the last is only a target), as `perplexity` reports it."""
    method._activate()
    window = method.dms_config.effective_window
    kept = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i: i + batch_size, :-1].to(_device_of(method.model))
            out = tm.forward_train(method.model, x, eviction=True, training=False, backend=ATTENTION_BACKEND["name"],
                                   kv_int8=method.int8_kv)
            kept.append(torch.stack([stats.kept_fraction(ev, window) for ev in out.evicted]).mean(dim=(0, 2)))
    return 1.0 / max(float(torch.cat(kept).mean()), 1e-12)


def calibrate_alpha_offset(method: Method, windows: torch.Tensor, target_cr: float, iters: int = 14,
                           log: Callable[[str], None] = print) -> float:
    """Bisection on alpha_offset (a larger offset evicts less) until the measured CR meets target_cr.
    Returns the offset whose CR came closest."""
    base = method.dms_config
    tried: Dict[float, float] = {}

    def cr_at(off: float) -> float:
        method.dms_config = base.replace(alpha_offset=float(off))
        tried[off] = measure_dms_cr(method, windows)
        return tried[off]

    s = base.alpha_scale
    lo, hi = -s, s
    for k in range(8):
        if cr_at(lo) >= target_cr:
            break
        lo -= s * 2 ** k
    for k in range(8):
        if cr_at(hi) <= target_cr:
            break
        hi += s * 2 ** k
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cr_at(mid) > target_cr:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda o: abs(tried[o] - target_cr))
    method.dms_config = base.replace(alpha_offset=float(best))
    if abs(tried[best] - target_cr) / target_cr > 0.05:
        log(f"calibration: CR {target_cr} not reachable with this model and window "
            f"({base.effective_window}); closest CR {tried[best]:.2f} at alpha_offset {best:.3f}")
    return best


# ============================================================================ generation
@torch.no_grad()
def generate_rows(method: Method, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  stop_tokens: Sequence[int] = (), sampling: SamplingConfig = SamplingConfig(),
                  generator: Optional[torch.Generator] = None):
    """Prefill the (ragged) prompts and decode; returns (new tokens per row, the final state)."""
    dev = _device_of(method.model)
    tokens, lengths = generation.pad_prompts(prompts, dev)
    state = method.new_state(len(prompts), int(lengths.max()) + max_new_tokens)
    logits = method.prefill(tokens, state, lengths)
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stop = set(stop_tokens)
    for step in range(max_new_tokens):
        nxt = generation.sample(logits, sampling, generator)
        for r, t in enumerate(nxt[:, 0].tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t in stop
        if all(done) or step == max_new_tokens - 1:
            break
        logits = method.step(nxt, state)
    return out, state


def _state_numbers(states) -> Dict[str, float]:
    live = sum(s.kv_bytes()["live"] for s in states)
    dense = sum(s.kv_bytes()["dense"] for s in states)
    kept = torch.cat([s.compression().per_layer_head.mean()[None] for s in states]).mean()
    return {"cr": 1.0 / max(float(kept), 1e-12), "kv_live_bytes": live, "kv_dense_bytes": dense}


def _batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i: i + size]


def probe_accuracy(method: Method, items: Sequence[eval_data.ProbeItem], decode, batch_size: int = 8,
                   stop_tokens: Sequence[int] = ()) -> Dict[str, Any]:
    """Needle / variable-tracking accuracy, overall and per (length, depth)."""
    scores, states, samples = [], [], []
    by_len: Dict[int, List[eval_data.ProbeItem]] = collections.defaultdict(list)
    for it in items:
        by_len[it.length].append(it)
    for length in sorted(by_len):
        for chunk in _batches(by_len[length], batch_size):
            outs, state = generate_rows(method, [it.prompt for it in chunk], chunk[0].max_new_tokens,
                                        stop_tokens=stop_tokens)
            states.append(state)
            for it, o in zip(chunk, outs):
                text = decode(o)
                s = eval_data.score_probe(it, text)
                scores.append((it.length, it.depth, s))
                if len(samples) < 4:
                    samples.append({"length": it.length, "depth": it.depth, "answer": it.answer, "output": text})
    grid: Dict[str, float] = {}
    for (L, d) in sorted({(L, d) for L, d, _ in scores}):
        vals = [s for L2, d2, s in scores if (L2, d2) == (L, d)]
        grid[f"len{L}_depth{d:g}"] = sum(vals) / len(vals)
    return {"accuracy": sum(s for *_, s in scores) / max(len(scores), 1), "n": len(scores), "by_length_depth": grid,
            **_state_numbers(states), "samples": samples}


def reasoning_accuracy(method: Method, items: Sequence[eval_data.ReasoningItem], render, decode, *,
                       max_new_tokens: int = 24, batch_size: int = 8, stop_tokens: Sequence[int] = ()) -> Dict[str, Any]:
    """Greedy answers scored by reasoning-gym's score_answer; per task and overall."""
    per_task: Dict[str, List[float]] = collections.defaultdict(list)
    states, samples = [], []
    for chunk in _batches(list(items), batch_size):
        outs, state = generate_rows(method, [render(it) for it in chunk], max_new_tokens,
                                    stop_tokens=stop_tokens)
        states.append(state)
        for it, o in zip(chunk, outs):
            text = decode(o)
            ans = eval_data.extract_answer(text)
            per_task[it.task].append(it.score(ans))
            if len(samples) < 4:
                samples.append({"question": it.question, "expected": it.entry["answer"], "output": text})
    allv = [s for v in per_task.values() for s in v]
    return {"accuracy": sum(allv) / max(len(allv), 1), "n": len(allv),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}, **_state_numbers(states),
            "samples": samples}


def render_reasoning(tok, item: eval_data.ReasoningItem) -> List[int]:
    """The item's solved examples as earlier chat turns, then its question (plain Q/A text without a
    chat template)."""
    def ask(q):
        return f"{q}\n{eval_data.REASONING_INSTRUCTION}"

    if getattr(tok, "chat_template", None):
        msgs = []
        for q, a in item.shots:
            msgs += [{"role": "user", "content": ask(q)}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": ask(item.question)})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"Question: {ask(q)}\nAnswer: {a}\n\n" for q, a in item.shots)
    return list(tok(text + f"Question: {ask(item.question)}\nAnswer:", add_special_tokens=False)["input_ids"])


def majority_vote(answers: Sequence[str]) -> str:
    """The most common normalised answer (ties: the one seen first)."""
    norm = [a.strip().lower() for a in answers]
    counts = collections.Counter(n for n in norm if n)
    if not counts:
        return answers[0] if answers else ""
    best = max(counts.values())
    for a, n in zip(answers, norm):
        if counts.get(n) == best:
            return a
    return answers[0]


def parallel_sampling(method: Method, items: Sequence[eval_data.ReasoningItem], render, decode, n_samples: int, *,
                      max_new_tokens: int = 24, sampling: SamplingConfig, seed: int = 0, questions_per_batch: int = 4,
                      stop_tokens: Sequence[int] = ()) -> Dict[str, Any]:
    """n_samples answers per question (one batch row each), majority vote, scored like reasoning."""
    gen = torch.Generator(device=_device_of(method.model)).manual_seed(seed)
    voted, each, states = [], [], []
    for chunk in _batches(list(items), questions_per_batch):
        prompts = [render(it) for it in chunk for _ in range(n_samples)]
        outs, state = generate_rows(method, prompts, max_new_tokens, stop_tokens=stop_tokens, sampling=sampling,
                                    generator=gen)
        states.append(state)
        for q, it in enumerate(chunk):
            answers = [eval_data.extract_answer(decode(o)) for o in outs[q * n_samples: (q + 1) * n_samples]]
            each += [it.score(a) for a in answers]
            voted.append(it.score(majority_vote(answers)))
    nums = _state_numbers(states)
    return {"samples_per_question": n_samples, "accuracy_vote": sum(voted) / len(voted),
            "accuracy_per_sample": sum(each) / len(each), "n": len(voted),
            "kv_live_bytes_per_question": nums["kv_live_bytes"] / len(voted), "cr": nums["cr"]}


# ============================================================================ output
def print_table(runs: List[Dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    cols = [("method", 9), ("req CR", 7), ("CR", 6), ("ppl", 8), ("KL", 8), ("reason", 7), ("needle", 7),
            ("vartrk", 7)]
    out.write(" ".join(f"{c:>{w}}" for c, w in cols) + "\n")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in runs:
        ppl = r.get("ppl") or {}
        row = [r["method"], num(r.get("requested_cr"), ".2f"), num(r.get("cr"), ".2f"), num(ppl.get("ppl"), ".3f"),
               num(ppl.get("kl"), ".4f"), num((r.get("reasoning") or {}).get("accuracy"), ".3f"),
               num((r.get("needle") or {}).get("accuracy"), ".3f"), num((r.get("vartrack") or {}).get("accuracy"), ".3f")]
        out.write(" ".join(f"{v:>{w}}" for v, (_, w) in zip(row, cols)) + "\n")


def plot_metrics(runs: List[Dict[str, Any]], out_dir: Path) -> List[str]:
    """One PNG per metric: the metric against CR, a line per method; vanilla as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [("ppl", "ppl", "perplexity"), ("kl", "ppl", "KL(vanilla || method) nats/token"),
             ("accuracy", "reasoning", "reasoning accuracy"), ("accuracy", "needle", "needle accuracy"),
             ("accuracy", "vartrack", "variable-tracking recall")]
    paths = []
    for key, metric, ylabel in specs:
        pts = [(r["method"], r.get("cr") or 1.0, (r.get(metric) or {}).get(key)) for r in runs]
        pts = [p for p in pts if p[2] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m in METHODS:
            xs = sorted((x, y) for name, x, y in pts if name == m)
            if not xs:
                continue
            if m == "vanilla":
                ax.axhline(xs[0][1], ls="--", color="gray", label="vanilla")
            else:
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=m)
        ax.set_xlabel("compression ratio (tokens seen / KV kept)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = "kl" if key == "kl" else metric
        path = out_dir / f"{name}_vs_cr.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _jsonable(x):
    """Plain JSON types (the CompressionReport objects are dropped: their numbers are kept_per_layer_head)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "report"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


# ============================================================================ the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dms_flex.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face-format folder; default: the embedded SmolLM2-135M-Instruct "
                                   "with its packaged DMS adapter")
    p.add_argument("--adapter", help="a DMS adapter folder (python -m dms_flex.pretrained export-adapter) applied "
                                     "to --model")
    p.add_argument("--no-adapter", action="store_true",
                   help="the embedded model without its packaged adapter (untrained decisions)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--cr", default="2,4", help="requested compression ratios (comma list)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {METRICS}")
    p.add_argument("--out", default="eval_out", help="folder for results.json and the plots")
    # DMS
    p.add_argument("--dms-window", action="append", default=[], metavar="[CR=]W",
                   help="DMS window: W for every DMS run, CR=W for the run of one requested CR (repeatable)")
    p.add_argument("--dms-alpha-offset", action="append", default=[], metavar="CR=OFFSET",
                   help="DMS alpha_offset to use for a requested CR (repeatable)")
    p.add_argument("--dms-checkpoint", action="append", default=[], metavar="[CR=]DIR",
                   help="a retrofit checkpoint to run DMS with: DIR for every DMS run (loaded once; with "
                        "--dms-calibrate its alpha_offset is calibrated per requested CR), CR=DIR for the run of one "
                        "requested CR, with that checkpoint's own settings (repeatable)")
    p.add_argument("--dms-calibrate", action="store_true",
                   help="find alpha_offset per requested CR by bisection on the perplexity windows (of --model's "
                        "DMS decisions, or of --dms-checkpoint DIR's)")
    p.add_argument("--no-match-dms-cr", dest="match_dms_cr", action="store_false",
                   help="run the baselines at the requested CR instead of DMS's achieved CR")
    p.add_argument("--dms-cached", action="store_true", help="perplexity of vanilla/DMS through the cache too")
    # baselines
    p.add_argument("--sinks", type=int, default=4, help="StreamingLLM attention sinks")
    p.add_argument("--heavy-fraction", type=float, default=0.5, help="H2O's heavy-hitter share of the budget")
    # perplexity
    p.add_argument("--texts", default=",".join(eval_data.TEXT_SOURCES), help="text sources (kjv, austen, code)")
    p.add_argument("--ppl-windows", type=int, default=1, help="windows per text source")
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--ppl-prefix", type=int, default=32, help="tokens of each window that are context only")
    p.add_argument("--batch-size", type=int, default=8)
    # reasoning
    p.add_argument("--reasoning-tasks", default=",".join(DEFAULT_REASONING_TASKS))
    p.add_argument("--reasoning-n", type=int, default=8, help="problems per task")
    p.add_argument("--reasoning-max-new", type=int, default=16)
    p.add_argument("--reasoning-shots", type=int, default=3, help="solved examples shown before each question")
    p.add_argument("--reasoning-default-difficulty", dest="easy_tasks", action="store_false",
                   help="use reasoning-gym's default difficulty instead of the small-sum setting of basic_arithmetic")
    p.add_argument("--parallel-samples", type=int, default=0, metavar="N",
                   help="also run N-sample majority voting with each compressed method at CR N vs 1 vanilla answer")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    # long context
    p.add_argument("--lengths", default="256,512", help="context lengths of the needle / variable tasks")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=1, help="items per (length, depth)")
    p.add_argument("--haystack", help="text source for haystacks (default: the first prose source found)")
    p.add_argument("--hops", type=int, default=2, help="variable-tracking chain links")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    # quantization and the reference
    p.add_argument("--kv", choices=["model", "int8"], default="model",
                   help="K/V storage of vanilla and DMS, as the served cache would hold it: the model dtype, or int8 "
                        "with one float32 scale per token and KV head (teacher-forced perplexity through the same "
                        "round trip; the baselines' PolicyState has no int8 storage: they stay in the model dtype)")
    p.add_argument("--weight-quant", choices=list(quant.WEIGHT_QUANT), default="none",
                   help="weight-only quantization (torchao) of the evaluated model's linear layers, DMS checkpoints "
                        "included; int4 runs in bfloat16 (the model is cast). The KL/PPL reference stays unquantized")
    p.add_argument("--reference", metavar="DIR",
                   help="the KL reference (vanilla) model's folder when it is not --model (e.g. --model is an "
                        "all-weights retrofit and DIR the original); default: --model, unquantized, full-precision KV")
    p.add_argument("--attention", choices=["dense", "flex", "auto"], default="dense",
                   help="attention of the full-sequence forwards (default dense: exact, nothing to compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the table and plots of an earlier run")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="combine several runs' results.json into --out (one table and one set of plots)")
    args = p.parse_args(argv)

    def floats(s, flag, ok=lambda x: True, allowed="numbers", empty_ok=False):
        """A comma list of finite numbers that pass `ok`; p.error (exit 2) names the flag otherwise."""
        out = []
        for x in s.split(","):
            if not x.strip():
                continue
            try:
                v = float(x)
            except ValueError:
                p.error(f"{flag}: {x.strip()!r} is not a number (want a comma list of {allowed})")
            if not math.isfinite(v) or not ok(v):
                p.error(f"{flag}: {x.strip()!r} is out of range (want a comma list of {allowed})")
            out.append(v)
        if not out and not empty_ok:
            p.error(f"{flag} is empty (want a comma list of {allowed})")
        return out

    for flag, value, low in (("--ppl-windows", args.ppl_windows, 1), ("--ppl-len", args.ppl_len, 2),
                             ("--batch-size", args.batch_size, 1), ("--reasoning-n", args.reasoning_n, 1),
                             ("--reasoning-max-new", args.reasoning_max_new, 1),
                             ("--reasoning-shots", args.reasoning_shots, 0), ("--trials", args.trials, 1),
                             ("--hops", args.hops, 1), ("--sinks", args.sinks, 0),
                             ("--parallel-samples", args.parallel_samples, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if not (0 <= args.heavy_fraction <= 1):
        p.error(f"--heavy-fraction must be in [0, 1], got {args.heavy_fraction}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (0 < args.top_p <= 1):
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give the folder for results.json and the plots")

    def names(s, allowed, what):
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad:
            p.error(f"unknown {what} {bad}; known: {allowed}")
        return out

    args.methods = names(args.methods, METHODS, "method(s)")
    args.metrics = names(args.metrics, METRICS, "metric(s)")
    args.texts = names(args.texts, eval_data.TEXT_SOURCES, "text source(s)")
    args.cr = floats(args.cr, "--cr", lambda c: c >= 1, "finite compression ratios >= 1", empty_ok=True)
    if args.parallel_samples and float(args.parallel_samples) not in args.cr:
        args.cr.append(float(args.parallel_samples))
    args.lengths = [int(x) for x in floats(args.lengths, "--lengths", lambda n: n >= 1 and n == int(n),
                                             "token counts (integers >= 1)")]
    args.depths = floats(args.depths, "--depths", lambda d: 0 <= d <= 1, "depths in [0, 1]")

    def cr_key(it):
        """The CR of a CR=VALUE item, None when the text before '=' is not a number (or there is no '=')."""
        k, sep, _ = it.partition("=")
        try:
            return float(k) if sep else None
        except ValueError:
            return None

    def finite(conv, low=None):
        def f(text):
            v = conv(text)
            if not math.isfinite(v) or (low is not None and v < low):
                raise ValueError(text)
            return v
        return f

    def per_cr(items, conv, flag):
        out = {}
        for it in items:
            k = cr_key(it)
            if k is None:
                p.error(f"{flag} wants CR=VALUE, got {it!r}")
            if not (math.isfinite(k) and k >= 1):
                p.error(f"{flag}: the CR in {it!r} must be a finite number >= 1")
            try:
                out[k] = conv(it.partition("=")[2])
            except ValueError:
                p.error(f"{flag}: bad value in {it!r}")
            if k not in args.cr:
                args.cr.append(k)
        return out

    whole = [w for w in args.dms_window if "=" not in w]
    if len(whole) > 1 or any(not w.isdigit() for w in whole):
        p.error(f"--dms-window takes one W >= 0 for all runs (and CR=W per run), got {whole}")
    args.dms_window_at = per_cr([w for w in args.dms_window if "=" in w], finite(int, 0), "--dms-window")
    args.dms_window = int(whole[0]) if whole else None
    args.dms_alpha_offset = per_cr(args.dms_alpha_offset, finite(float), "--dms-alpha-offset")
    whole_ckpt = [c for c in args.dms_checkpoint if cr_key(c) is None]  # a DIR may contain '=' (not after a number)
    if len(whole_ckpt) > 1 or any(not c for c in whole_ckpt):
        p.error(f"--dms-checkpoint takes one DIR for all DMS runs (and CR=DIR per run), got {whole_ckpt}")
    args.dms_checkpoint_all = whole_ckpt[0] if whole_ckpt else None
    args.dms_checkpoint = per_cr([c for c in args.dms_checkpoint if cr_key(c) is not None], str, "--dms-checkpoint")
    args.cr = sorted(set(args.cr))
    if not (1 <= args.ppl_prefix < args.ppl_len):
        p.error("--ppl-prefix must be in [1, --ppl-len)")
    return args


def run(args, loaded=None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The whole evaluation; `loaded` (a pretrained.DMSModel) skips loading --model."""
    from . import pretrained

    torch.manual_seed(args.seed)
    ATTENTION_BACKEND["name"] = args.attention
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_quantization(args, device, dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = args.model
    t0 = time.perf_counter()
    if loaded is None:
        adapter = getattr(args, "adapter", None)
        if folder is None:  # the embedded model, with its trained DMS adapter when one ships
            from .smollm2 import default_model

            folder, adapter, _ = default_model(adapter, getattr(args, "no_adapter", False))
        overrides = {"window": args.dms_window} if args.dms_window is not None else None
        loaded = pretrained.load_dms_model(folder, dms_overrides=overrides, dtype=dtype, device=device,
                                           adapter=adapter)
        if adapter is not None:
            log(f"DMS adapter: {adapter}")
    base = loaded
    dtype = next(base.model.parameters()).dtype
    tok = base.tokenizer
    if tok is None:
        raise ValueError(f"{folder} has no tokenizer: the evaluation needs one")
    log(f"model: {folder or base.family} ({base.family}, {dtype}, {device}), loaded in {time.perf_counter() - t0:.1f}s; "
        f"DMS settings {base.dms}{'' if base.dms_trained else ' (not a DMS retrofit: untrained decisions)'}")
    # the KL/PPL reference first (an unquantized copy must be taken before the weights are quantized)
    reference, ref_name = load_reference(args, base, folder, log)
    n_quantized = quantize_model(base.model, args.weight_quant, log, what="the model")
    dtype = next(base.model.parameters()).dtype  # int4 casts to bfloat16
    qinfo = quantization_info(args, dtype, reference, ref_name, n_quantized)
    log(f"setting: {format_setting(qinfo)}")

    def encode(text):
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    stops = [t for t in [tok.eos_token_id] if t is not None]
    results: Dict[str, Any] = {"model": str(folder or base.family), "device": str(device), "dtype": str(dtype),
                               "settings": {k: v for k, v in vars(args).items()}, "quantization": qinfo,
                               "data": {}, "runs": [], "skipped": {}}

    # ---- data
    texts = eval_data.load_texts(args.texts, log=log)
    results["data"] = {s.name: s.origin for s in texts.values()}
    windows = torch.tensor([w for s in texts.values()
                            for w in eval_data.text_windows(encode, s.text, args.ppl_windows, args.ppl_len)])
    log(f"perplexity: {windows.shape[0]} windows of {args.ppl_len} tokens from {list(texts)}; the first "
        f"{args.ppl_prefix} of each are context only")
    items = []
    if "reasoning" in args.metrics or args.parallel_samples:
        why = eval_data.reasoning_available()
        if why is None:
            kw = DEFAULT_TASK_KWARGS if args.easy_tasks else {}
            items = eval_data.reasoning_items(args.reasoning_tasks.split(","), args.reasoning_n, task_kwargs=kw,
                                              shots=args.reasoning_shots)
        else:
            log(f"reasoning: skipped: {why}")
            results["skipped"]["reasoning"] = why
    haystack = texts.get(args.haystack) if args.haystack else next(
        (texts[n] for n in ("austen", "kjv", "code") if n in texts), None)
    if args.haystack and haystack is None:
        raise ValueError(f"--haystack {args.haystack} is not among the loaded texts {list(texts)}")
    probes = {}
    for kind in ("needle", "vartrack"):
        if kind in args.metrics:
            probes[kind] = eval_data.probe_items(kind, encode, decode, haystack.text, args.lengths, args.depths,
                                                 args.trials, seed=args.seed, hops=args.hops)
    check_context(base.model, args.ppl_len, [it for its in probes.values() for it in its])
    if probes:
        log(f"long context: haystack {haystack.name}; lengths {args.lengths}, depths {args.depths}, "
            f"{args.trials} trial(s) each")

    def render(item: eval_data.ReasoningItem) -> List[int]:
        return render_reasoning(tok, item)

    # ---- methods
    vanilla = Method("vanilla", base.model, kv_int8=args.kv == "int8")
    methods = build_methods(args, base)
    cal = windows  # DMS CR measurement and calibration: the perplexity windows

    def evaluate(m: Method) -> Dict[str, Any]:
        rec: Dict[str, Any] = {"method": m.name, "requested_cr": m.requested_cr, "cr": m.cr, "setting": m.setting,
                               "kv": kv_label(m, dtype), "weights": args.weight_quant}
        t = time.perf_counter()
        if "ppl" in args.metrics:
            rec["ppl"] = perplexity(m, windows, reference, prefix=args.ppl_prefix, batch_size=args.batch_size,
                                    cached=args.dms_cached)
        if items and "reasoning" in args.metrics:
            rec["reasoning"] = reasoning_accuracy(m, items, render, decode, max_new_tokens=args.reasoning_max_new,
                                                  batch_size=args.batch_size, stop_tokens=stops)
        for kind, its in probes.items():
            rec[kind] = probe_accuracy(m, its, decode, batch_size=args.batch_size, stop_tokens=stops)
        if items and args.parallel_samples and (not m.compressed or m.requested_cr == args.parallel_samples
                                                 or (m.name == "dms" and m.requested_cr is None)):
            if m.compressed:
                rec["parallel"] = parallel_sampling(
                    m, items, render, decode, args.parallel_samples, max_new_tokens=args.reasoning_max_new,
                    sampling=SamplingConfig(args.temperature, top_p=args.top_p), seed=args.seed, stop_tokens=stops)
            else:  # the 1-sample reference: vanilla's greedy answer (its KV bytes per question)
                r = rec.get("reasoning") or reasoning_accuracy(m, items, render, decode,
                                                               max_new_tokens=args.reasoning_max_new,
                                                               batch_size=args.batch_size, stop_tokens=stops)
                rec["parallel"] = {"samples_per_question": 1, "accuracy_vote": r["accuracy"],
                                   "accuracy_per_sample": r["accuracy"], "n": r["n"],
                                   "kv_live_bytes_per_question": r["kv_live_bytes"] / max(r["n"], 1), "cr": 1.0}
        rec["seconds"] = time.perf_counter() - t
        log(f"  {m.label:<18} done in {rec['seconds']:.1f}s" + (
            f"  ppl {rec['ppl']['ppl']:.3f} KL {rec['ppl']['kl']:.4f} (CR {rec['ppl']['cr']:.2f})" if "ppl" in rec
            else ""))
        return rec

    path = out_dir / "results.json"
    runs: List[Dict[str, Any]] = []

    def record(rec: Dict[str, Any]) -> None:
        """Keep a finished run and rewrite results.json with every run so far (marked partial), so a
        run stopped by a time limit still leaves the methods it finished."""
        runs.append(rec)
        partial = _jsonable({**results, "runs": runs, "partial": True})
        tmp = path.with_name(f".{path.name}.tmp")  # whole or not at all: a kill mid-write leaves the last one
        tmp.write_text(json.dumps(partial, indent=1, default=str))
        tmp.replace(path)

    log("evaluating:")
    if "vanilla" in args.methods:
        record(evaluate(vanilla))
    dms_cr: Dict[Optional[float], float] = {}
    checkpoints = CheckpointLoader(args, base.model, log)
    dms_methods = [m for m in methods if m.name == "dms"]
    for i, m in enumerate(dms_methods):
        prepare_dms(m, args, base, cal, log, checkpoints)
        record(evaluate(m))
        dms_cr[m.requested_cr] = m.cr
        if m.checkpoint is not None:  # free a checkpoint once no later DMS run needs it
            m.model = None
            if all(o.checkpoint != m.checkpoint for o in dms_methods[i + 1:]):
                checkpoints.release(m.checkpoint)
    for m in methods:
        if m.name in bl.POLICIES:
            if args.match_dms_cr and m.requested_cr in dms_cr:
                m.cr = dms_cr[m.requested_cr]
                m.setting = f"at DMS's achieved CR for the request {m.requested_cr:g}"
            record(evaluate(m))
    results["runs"] = runs
    if args.parallel_samples:
        results["parallel"] = parallel_rows(runs)
    results = _jsonable(results)
    path.write_text(json.dumps(results, indent=1, default=str))  # first without plots: they may fail
    print(f"setting: {format_setting(results['quantization'])}")
    print_table(results["runs"])
    print_parallel(results.get("parallel"))
    results.update(draw(results, out_dir, log))
    path.write_text(json.dumps(results, indent=1, default=str))
    log(f"results: {path}" + (f"; plots: {', '.join(results['plots'] + results['heatmaps'])}" if results["plots"] else ""))
    return results


def check_context(model: nn.Module, ppl_len: int, probes: Sequence[eval_data.ProbeItem]) -> None:
    """Refuse perplexity windows or probes (prompt + answer tokens) longer than the model's context
    (positions past it have no RoPE entry), with the longest values that fit."""
    ctx = getattr(model, "max_seq_len", None)
    if not ctx:
        return
    if ppl_len > ctx:
        raise ValueError(f"--ppl-len {ppl_len} is longer than the model's context ({ctx} tokens): use --ppl-len {ctx} "
                         f"or less")
    over = sorted({it.length for it in probes if len(it.prompt) + it.max_new_tokens > ctx})
    if over:
        room = max(it.max_new_tokens for it in probes)
        raise ValueError(f"--lengths {','.join(map(str, over))}: a probe's prompt plus its answer ({room} tokens) must fit "
                         f"the model's context of {ctx} tokens; use lengths up to {ctx - room}")


def print_parallel(rows, out=None) -> None:
    out = out or sys.stdout
    if not rows:
        return
    out.write("parallel sampling at equal KV memory (vanilla: 1 greedy answer; the others: N samples, majority vote):\n")
    ref = next((r["kv_live_bytes_per_question"] for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        ratio = r["kv_live_bytes_per_question"] / ref if ref else None
        out.write(f"  {r['method']:<9} CR {r['cr'] or 1:.2f}, {r['samples_per_question']} sample(s): vote accuracy "
                  f"{r['accuracy_vote']:.3f}, per-sample {r['accuracy_per_sample']:.3f}, KV "
                  f"{r['kv_live_bytes_per_question'] / 2**10:.1f} KiB per question"
                  + (f" ({ratio:.2f}x vanilla's)" if ratio is not None and r["method"] != "vanilla" else "") + "\n")
        if ratio is not None and ratio > 1.1:
            out.write(f"  note: {r['method']} is NOT at equal memory: it reached only CR {r['cr'] or 1:.2f} on these "
                      f"generations against the {r['samples_per_question']} samples it runs (sequences too short for "
                      f"its window to matter); use longer generations (--reasoning-max-new) or fewer samples\n")


def draw(results: Dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> Dict[str, List[str]]:
    """The metric-vs-CR plots and the kept-fraction heat maps, from a results dict (fresh or loaded
    from results.json). Skipped with a message when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log("plots skipped: matplotlib is not installed (pip install matplotlib; or redraw elsewhere with "
            "python -m dms_flex.eval --replot results.json)")
        return {"plots": [], "heatmaps": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    heatmaps = []
    for r in runs:
        kept = (r.get("ppl") or {}).get("kept_per_layer_head")
        if r["method"] == "vanilla" or not kept:
            continue
        report = stats.CompressionReport(per_layer_head=torch.tensor(kept))
        path = out_dir / f"kept_{r['method']}_cr{(r.get('cr') or report.ratio):.2f}.png"
        heatmaps.append(stats.plot_kept_heatmap(report, str(path), title=f"{r['method']} kept fraction"))
    return {"plots": plot_metrics(runs, out_dir), "heatmaps": heatmaps}


def parallel_rows(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The parallel-sampling table's rows: one per run that has a parallel-sampling result."""
    return [{"method": r["method"], "cr": r["cr"], **r["parallel"]} for r in runs if "parallel" in r]


def merge(paths: Sequence[str], out_dir: str) -> int:
    """One table and one set of plots from several results.json files (e.g. one process per baseline
    run side by side): runs are concatenated in file order, a (method, requested CR) pair seen twice
    keeps its first run (the vanilla and DMS runs every file repeats)."""
    merged: Dict[str, Any] = {"merged_from": [], "runs": [], "parallel": []}
    seen = set()
    for path in paths:
        try:  # a process killed before its first method finished leaves no file: merge the others
            res = json.loads(Path(path).read_text())
        except FileNotFoundError:
            print(f"{path}: missing (that process finished no method); skipped")
            continue
        except json.JSONDecodeError as e:
            print(f"{path}: not valid JSON ({e}); skipped")
            continue
        merged["merged_from"].append(str(path))
        if res.get("partial"):  # written after each run: the process stopped before its last method
            print(f"{path}: partial (the run stopped early): {len(res.get('runs') or [])} finished run(s) kept")
            merged.setdefault("partial_inputs", []).append(str(path))
            res.setdefault("parallel", parallel_rows(res.get("runs") or []))
        for k, v in res.items():
            if k not in ("runs", "parallel", "plots", "heatmaps", "partial"):
                merged.setdefault(k, v)
        for part, key in (("runs", "requested_cr"), ("parallel", "cr")):
            for r in res.get(part) or []:
                if (part, r["method"], r.get(key)) not in seen:
                    seen.add((part, r["method"], r.get(key)))
                    merged[part].append(r)
    if not merged["runs"]:
        raise ValueError(f"no runs to merge in {list(paths)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    return replot(str(out / "results.json"))


def replot(path: str) -> int:
    """Redraw the plots of a results.json next to it (e.g. on a machine with matplotlib)."""
    p = Path(path)
    results = json.loads(p.read_text())
    if results.get("quantization"):
        print(f"setting: {format_setting(results['quantization'])}")
    print_table(results["runs"])
    print_parallel(results.get("parallel"))
    results.update(draw(results, p.parent))
    p.write_text(json.dumps(results, indent=1, default=str))
    print(f"plots: {', '.join(results['plots'] + results['heatmaps'])}")
    return 0


def build_methods(args, base) -> List[Method]:
    """DMS runs (one per requested CR that has a DMS setting, else one with the model's own) and the
    baselines at each requested CR. A DMS run is made ready (loaded, calibrated, CR measured) by
    `prepare_dms` just before it runs: a per-CR checkpoint (CR=DIR) is in memory only for its run, the
    shared one (--dms-checkpoint DIR) for all DMS runs."""
    methods: List[Method] = []
    kv_int8 = args.kv == "int8"
    whole = args.dms_checkpoint_all
    if "dms" in args.methods:
        per_cr = sorted(set(args.dms_checkpoint) | set(args.dms_alpha_offset) | set(args.dms_window_at)
                        | (set(args.cr) if args.dms_calibrate else set()))
        for c in per_cr:
            over: Dict[str, Any] = {}
            if c in args.dms_window_at:
                over["window"] = args.dms_window_at[c]
            m = Method("dms", base.model, requested_cr=c, kv_int8=kv_int8)
            if c in args.dms_checkpoint:  # a retrofit for this CR: its own settings (a per-CR window aside)
                m.checkpoint, m.setting = args.dms_checkpoint[c], f"checkpoint {args.dms_checkpoint[c]}"
            else:
                m.checkpoint = whole
                prefix = f"checkpoint {whole}: " if whole else ""
                if c in args.dms_alpha_offset:
                    over["alpha_offset"] = args.dms_alpha_offset[c]
                    m.setting = prefix + f"alpha_offset {args.dms_alpha_offset[c]:g}"
                elif args.dms_calibrate:
                    m.calibrate, m.setting = True, prefix + "calibrate"
                else:  # only a per-CR window brought this CR here
                    m.setting = prefix + f"window {args.dms_window_at[c]}"
            if m.checkpoint is None:
                m.dms_config = base.dms.replace(**over) if over else base.dms
            else:  # prepare_dms loads it and applies the overrides to its own settings
                m.model, m.dms_overrides = None, over
            methods.append(m)
        if not per_cr:
            if whole:
                methods.append(Method("dms", None, checkpoint=whole, setting=f"checkpoint {whole}: its own DMS settings",
                                      kv_int8=kv_int8))
            else:
                methods.append(Method("dms", base.model, dms_config=base.dms, setting="the model's own DMS settings",
                                      kv_int8=kv_int8))
    kw = {"streaming": {"sinks": args.sinks}, "h2o": {"heavy_fraction": args.heavy_fraction}, "tova": {}}
    for name in bl.POLICIES:
        if name in args.methods:
            # kv_int8 only labels them: PolicyState has no int8 storage (Method.int8_kv is False for a policy)
            methods += [Method(name, base.model, cr=c, requested_cr=c, policy_kw=kw[name], kv_int8=kv_int8)
                        for c in args.cr]
    return methods


class CheckpointLoader:
    """The DMS checkpoints of --dms-checkpoint, each loaded once (in the evaluated model's dtype and device,
    weight-quantized like it, with --dms-window's override) and kept until `release`."""

    def __init__(self, args, like: nn.Module, log: Callable[[str], None] = print):
        self.args, self.like, self.log = args, like, log
        self.loaded: Dict[str, Any] = {}

    def get(self, folder: str):
        if folder not in self.loaded:
            from . import pretrained

            p = next(self.like.parameters())
            window = self.args.dms_window
            t = time.perf_counter()
            dm = pretrained.load_dms_model(folder, dms_overrides={"window": window} if window is not None else None,
                                           dtype=p.dtype, device=p.device)
            quantize_model(dm.model, self.args.weight_quant, self.log, what=f"checkpoint {folder}")
            self.loaded[folder] = dm
            self.log(f"dms: loaded checkpoint {folder} in {time.perf_counter() - t:.1f}s; DMS settings {dm.dms}")
        return self.loaded[folder]

    def release(self, folder: str) -> None:
        self.loaded.pop(folder, None)


def prepare_dms(m: Method, args, base, cal: torch.Tensor, log, checkpoints: Optional[CheckpointLoader] = None) -> None:
    """Load the run's checkpoint (through `checkpoints`, which keeps a shared one), calibrate alpha_offset
    if asked, and measure the achieved CR."""
    if m.checkpoint is not None:
        dm = (checkpoints or CheckpointLoader(args, base.model, log)).get(m.checkpoint)
        m.model = dm.model
        m.dms_config = dm.dms.replace(**m.dms_overrides) if m.dms_overrides else dm.dms
    if m.calibrate:
        off = calibrate_alpha_offset(m, cal, m.requested_cr, log=log)
        m.calibrate = False
        m.setting = (f"checkpoint {m.checkpoint}: " if m.checkpoint else "") + f"alpha_offset {off:.3f} (calibrated)"
    m.cr = measure_dms_cr(m, cal)
    log(f"dms: {m.setting}: window {m.dms_config.effective_window}, achieved CR {m.cr:.2f}"
        + (f" (requested {m.requested_cr:g})" if m.requested_cr else "") + (", int8 K/V" if m.int8_kv else ""))


# ============================================================================ quantization and the reference
def check_quantization(args, device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, with a ValueError (printed as `error: ...`), on a --kv / --weight-quant this setup cannot run."""
    if args.kv == "model" and args.weight_quant == "none":
        return
    what = " and ".join(x for x in (f"--kv {args.kv}" if args.kv != "model" else "",
                                    f"--weight-quant {args.weight_quant}" if args.weight_quant != "none" else "") if x)
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{what} needs torchao (pip install torchao): {e}") from None
    if args.kv == "int8":
        try:  # the cache's own round trip, on this device and dtype
            q, s = quant.quantize_kv(torch.randn(1, 1, 2, 8, device=device, dtype=dtype))
            quant.dequantize_kv(q, s, dtype)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise ValueError(f"--kv int8 cannot run on {device} with {dtype}: {e}") from None


def quantize_model(model: nn.Module, mode: str, log: Callable[[str], None] = print, what: str = "the model") -> int:
    """quant.quantize_weights in place; int4 first casts the model to bfloat16 (torchao's int4 layouts, CPU
    and CUDA, take bf16 weights; dms_flex.generate does the same). Returns the number of quantized weights."""
    if mode == "none":
        return 0
    p = next(model.parameters())
    if mode == "int4" and p.dtype != torch.bfloat16:
        log(f"note: int4 weights need bf16: casting {what} from {p.dtype} to torch.bfloat16")
        model.to(torch.bfloat16)
    try:
        quant.quantize_weights(model, mode)
    except (RuntimeError, NotImplementedError, AssertionError, TypeError) as e:
        raise ValueError(f"--weight-quant {mode} failed for {what} on {p.device} ({p.dtype}): {e}") from None
    n = len(quant.quantized_weight_names(model))
    if n == 0:
        raise ValueError(f"--weight-quant {mode}: no linear layer of {what} could be quantized (int4 needs input "
                         f"widths that are multiples of 32)")
    return n


def load_reference(args, base, folder, log: Callable[[str], None] = print):
    """The KL/PPL reference: --reference DIR, else --model itself (the same module when its weights stay
    unquantized, else an unquantized copy). Returns (model, name)."""
    from . import pretrained

    p = next(base.model.parameters())
    name = str(folder or base.family)
    if args.reference and not (folder is not None and Path(args.reference).resolve() == Path(folder).resolve()
                               and args.weight_quant == "none"):
        t = time.perf_counter()
        ref = pretrained.load_dms_model(args.reference, dtype=p.dtype, device=p.device).model
        if ref.tok_embeddings.num_embeddings != base.model.tok_embeddings.num_embeddings:
            raise ValueError(f"--reference {args.reference} has a vocabulary of {ref.tok_embeddings.num_embeddings} "
                             f"tokens, --model {base.model.tok_embeddings.num_embeddings}: KL needs the same tokenizer")
        log(f"reference: {args.reference} loaded in {time.perf_counter() - t:.1f}s")
        return ref, str(args.reference)
    if args.weight_quant != "none":
        # memory: one more copy of the weights in the model dtype (e.g. 16 GB for an 8B model in bf16), held
        # for the whole run; the quantized model is the smaller of the two
        import copy

        return copy.deepcopy(base.model), name + " (an unquantized copy)"
    return base.model, name


def kv_label(m: Method, dtype: torch.dtype) -> str:
    model_dtype = str(dtype).replace("torch.", "")
    if m.int8_kv:
        return "int8"
    if m.kv_int8:  # a policy under --kv int8
        return f"{model_dtype} (PolicyState has no int8 KV storage)"
    return model_dtype


def quantization_info(args, dtype, reference: nn.Module, ref_name: str, n_quantized: int) -> Dict[str, Any]:
    model_dtype = str(dtype).replace("torch.", "")
    policies = [m for m in args.methods if m in bl.POLICIES]
    kv_by = {m: ("int8" if args.kv == "int8" and m in ("vanilla", "dms") else model_dtype) for m in args.methods}
    info = {"kv": args.kv, "kv_by_method": kv_by, "weights": args.weight_quant,
            "quantized_weights": n_quantized, "model_dtype": model_dtype,
            "reference": ref_name, "reference_dtype": str(next(reference.parameters()).dtype).replace("torch.", ""),
            "reference_kv": "full precision (its dtype)", "reference_weights": "unquantized"}
    if args.kv == "int8" and policies:
        info["note"] = (f"the baselines ({', '.join(policies)}) keep K/V in {model_dtype}: PolicyState has no "
                        f"int8 KV storage")
    return info


def format_setting(q: Dict[str, Any]) -> str:
    kv = "K/V in the model dtype" if q["kv"] == "model" else "K/V int8 (one scale per token and KV head)"
    if q["kv"] == "int8":
        ints = [m for m, v in q["kv_by_method"].items() if v == "int8"]
        kv += f" for {', '.join(ints) or 'no method'}"
        if q.get("note"):
            kv += f"; {q['note']}"
    w = "unquantized weights" if q["weights"] == "none" else (
        f"{q['weights']} weights ({q['quantized_weights']} linear layers of the model)")
    return (f"{kv}; {w}, {q['model_dtype']}; KL/PPL reference {q['reference']} ({q['reference_dtype']}, "
            f"unquantized weights, full-precision K/V)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.replot:
            return replot(args.replot)
        if args.merge:
            return merge(args.merge, args.out)
        run(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
