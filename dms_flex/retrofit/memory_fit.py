"""The memory model of one rank of a retrofit, fitted to measurements (issue 20 item 3):

    peak bytes = fixed + per_token x (max_seq_len x batch_size)

per (model shape, variant, world size, activation checkpointing, compile). `COEFFICIENTS` is the one table
of fitted coefficients; a key that is not in it gets the PRIOR, the analytic estimate this recipe printed
before measurements existed (dms_flex/retrofit/memory.py's formula, extended to every variant): weights,
gradients and Adam state, the teacher, the distillation's logit chunks (fixed) and the bf16 activations
(per token). The prior leaves out the CUDA context, the allocator's slack and temporaries, so it is a lower
bound: RESULTS.md section 16 measured SmolLM2-135M's real peak at ~1.5x it in eager mode, ~1.25x compiled.

`fit(records)` fits the coefficients by least squares to benchmark.json records (benchmarks/bench_retrofit.py,
which also writes them with --fit: the longest row and the largest micro-batch that fit one GPU), reports
each record's error, and `table_lines` prints the entries to paste into COEFFICIENTS. The recipe logs
`memory_message` at start-up: the model's prediction for the run, and which kind it is (FITTED or ESTIMATE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

GiB = 2**30
KiB = 2**10
VARIANTS = ("all", "adapter", "adapter_int8", "adapter_nf4", "adapter_lora")

# (shape, variant, world_size, activation_checkpointing, compile) -> (fixed GiB, per-token KiB, source).
# Filled from the H200 measurements of `benchmarks/bench_retrofit.py` (benchmarks/RESULTS.md sections 23b and
# 24b; raw JSON in benchmarks/results/h200_2026-11-30_evening/ and h200_2026-11-30_night/). Keys measured at
# four sizes (`--fit`: rows of 32K-213K tokens and micro-batches of 32K-token rows, least squares) hold their
# fit. Keys measured at one size (32,768 tokens x 1) take the per-token slope measured on the same shape's
# 1-GPU adapter fit (activations per rank do not depend on FSDP2's sharding of the weights) and calibrate the
# fixed part to their one peak. Other keys get the prior.
_MEASURED_SLOPE_KIB = 578.277  # Llama-3-8B shapes, adapter, 1 GPU, checkpointing on (the fit below)
_PRIOR_SLOPE_KIB = 386.000  # the prior's per-token KiB for the same key


def _one_point(peak_gib: float, per_token_kib: float, slope_note: str) -> Tuple[float, float, str]:
    """An entry calibrated by one H200 peak at 32,768 tokens x 1, with the given per-token slope."""
    fixed = peak_gib - per_token_kib * 32768 * KiB / GiB
    return (
        round(fixed, 3),
        per_token_kib,
        f"measured once on an H200 at 32,768 tokens x 1 ({peak_gib} GiB); {slope_note}",
    )


_LLAMA3_8B = "llama-L32-d4096-h32/8-ff14336-V128256-untied"
_QWEN25_7B = "qwen2-L28-d3584-h28/4-ff18944-V152064-untied"
_SLOPE_8B = "slope of the 1-GPU adapter fit"
COEFFICIENTS: Dict[Tuple[str, str, int, bool, bool], Tuple[float, float, str]] = {
    (_LLAMA3_8B, "adapter", 1, True, False): (15.198, 578.277, "fitted to 4 runs at 4 sizes, max error 0.1%"),
    (_LLAMA3_8B, "adapter_int8", 1, True, False): (8.877, 605.743, "fitted to 4 runs at 4 sizes, max error 0.4%"),
    (_LLAMA3_8B, "adapter_nf4", 1, True, False): (6.659, 586.690, "fitted to 5 runs at 4 sizes, max error 2.1%"),
    (_LLAMA3_8B, "adapter", 1, True, True): _one_point(34.535, _MEASURED_SLOPE_KIB, _SLOPE_8B + " (eager)"),
    (_LLAMA3_8B, "all", 2, True, False): _one_point(127.126, _MEASURED_SLOPE_KIB, _SLOPE_8B),
    (_LLAMA3_8B, "adapter", 2, True, False): _one_point(59.801, _MEASURED_SLOPE_KIB, _SLOPE_8B),
    # Qwen2.5-7B: its prior slope scaled by the measured / prior slope ratio of the Llama-3-8B adapter fit
    (_QWEN25_7B, "adapter", 1, True, False): _one_point(
        32.370, round(344.875 * _MEASURED_SLOPE_KIB / _PRIOR_SLOPE_KIB, 3), "slope: prior x (Llama-3-8B fit / prior)"
    ),
}


@dataclass(frozen=True)
class MemoryModel:
    fixed_bytes: float
    per_token_bytes: float
    kind: str  # "FITTED" or "ESTIMATE"
    source: str

    def predict(self, tokens: int) -> float:
        """Peak bytes of a micro-batch of `tokens` tokens (max_seq_len x batch_size)."""
        return self.fixed_bytes + self.per_token_bytes * tokens

    def max_tokens(self, capacity_bytes: float) -> int:
        """The most tokens per micro-batch within `capacity_bytes` (0: not even the fixed part fits)."""
        room = capacity_bytes - self.fixed_bytes
        return max(0, int(room // self.per_token_bytes)) if self.per_token_bytes > 0 else 0


def shape_key(hf: Dict[str, Any]) -> str:
    """The model's shape as a key: layers, width, heads/KV heads, MLP width, vocabulary, tied, family."""
    from dms_flex.checkpoints.hf_config import model_family

    tied = "tied" if hf.get("tie_word_embeddings") else "untied"
    return (
        f"{model_family(hf)}-L{hf['num_hidden_layers']}-d{hf['hidden_size']}-h{hf['num_attention_heads']}/"
        f"{hf.get('num_key_value_heads') or hf['num_attention_heads']}-ff{hf['intermediate_size']}-"
        f"V{hf['vocab_size']}-{tied}"
    )


def _params(hf: Dict[str, Any]) -> Dict[str, float]:
    L, d, V = int(hf["num_hidden_layers"]), int(hf["hidden_size"]), int(hf["vocab_size"])
    ff, H = int(hf["intermediate_size"]), int(hf["num_attention_heads"])
    Hkv = int(hf.get("num_key_value_heads") or H)
    hd = d // H
    linear = L * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * ff)
    out = 0 if hf.get("tie_word_embeddings") else V * d
    bias = L * (H + 2 * Hkv) * hd if hf.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in str(hf) else 0
    plain = V * d + L * 2 * d + d + bias  # embeddings, norms, biases
    return dict(L=L, d=d, V=V, ff=ff, H=H, Hkv=Hkv, hd=hd, linear=linear, out=out, plain=plain)


def prior(
    hf: Dict[str, Any],
    variant: str,
    world_size: int = 1,
    activation_checkpointing: bool = True,
    kd_chunk_size: int = 1024,
    decision: str = "adapter",
    act_bytes: int = 2,
) -> MemoryModel:
    """Today's analytic estimate, as fixed + per-token bytes (a lower bound; module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
    p = _params(hf)
    L, d, V, ff, H, Hkv, hd = (p[k] for k in ("L", "d", "V", "ff", "H", "Hkv", "hd"))
    n = p["linear"] + p["out"] + p["plain"]  # every base parameter
    adapter = L * (d * Hkv + d) if decision == "adapter" else 0
    W = max(1, int(world_size))
    units = 2 * 4 * max(3 * d * ff, d * (H + 2 * Hkv) * hd)  # FSDP: two gathered fp32 layer units in flight
    root = 4 * (p["plain"] + p["out"])  # FSDP's root unit (embeddings, output, norms) gathered for the step
    if variant == "all":
        # fp32 master weights + gradients + Adam (16 B/param), sharded over W, and a full bf16 teacher per rank
        fixed = 16 * n / W + 2 * n + (units + root if W > 1 else 0)
    elif variant in ("adapter", "adapter_lora"):
        fixed = (2 * n if W == 1 else 4 * n / W + units + root) + 16 * adapter
    else:  # a quantized frozen base (one device): values + scales, embeddings/norms in bf16, the dequantized output
        per_param = {"adapter_int8": 1.0 + 4 / d, "adapter_nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}[variant]
        fixed = (p["linear"] + p["out"]) * per_param + 2 * p["plain"] + 2 * V * d + 16 * adapter
    fixed += 2 * 2 * kd_chunk_size * V * 4  # the distillation's fp32 logit chunks (student, teacher; + grad)
    layer_set = act_bytes * (d + H * hd + 2 * Hkv * hd + d + 3 * ff)  # q, k, v, attention out, MLP hidden x 3
    acts = act_bytes * d * L + layer_set if activation_checkpointing else layer_set * L
    acts += 2 * act_bytes * d + 2 * 4 * L * Hkv  # teacher and student last hidden states; decision logits + noise
    ckpt = "on" if activation_checkpointing else "off"
    return MemoryModel(
        fixed,
        acts,
        "ESTIMATE",
        f"prior: analytic lower bound, not measured ({variant}, {W} rank(s), activation checkpointing {ckpt})",
    )


def lookup(
    hf: Dict[str, Any],
    variant: str,
    world_size: int,
    activation_checkpointing: bool,
    compile: bool,
    *,
    table: Optional[Dict] = None,
    **prior_kw,
) -> MemoryModel:
    """The fitted model of this key if the table has it, else the prior."""
    table = COEFFICIENTS if table is None else table
    key = (shape_key(hf), variant, int(world_size), bool(activation_checkpointing), bool(compile))
    if key in table:
        fixed_gib, per_token_kib, source = table[key]
        return MemoryModel(fixed_gib * GiB, per_token_kib * KiB, "FITTED", source)
    return prior(hf, variant, world_size, activation_checkpointing, **prior_kw)


def memory_message(hf: Dict[str, Any], cfg, dms, adapter_only: bool, base_weights: str, world_size: int) -> str:
    """The recipe's start-up line: this run's predicted peak per rank, its parts, and how far rows could grow."""
    from .random_init import variant_name

    lora = cfg.get("lora", None)
    variant = variant_name(adapter_only, base_weights, lora is not None and bool(lora.get("enabled", False)))
    ckpt, compiled = bool(cfg.get("enable_activation_checkpointing", False)), bool(cfg.get("compile", False))
    model = lookup(
        hf,
        variant,
        world_size,
        ckpt,
        compiled,
        kd_chunk_size=int(cfg.get("kd_chunk_size", 1024)),
        decision=dms.decision,
        act_bytes=2 if cfg.dtype == "bf16" else 4,
    )
    tokens = int(cfg.batch_size) * int(cfg.max_seq_len)
    text = (
        f"memory per rank, {model.kind}{' (not a measurement)' if model.kind == 'ESTIMATE' else ''}: "
        f"{model.predict(tokens) / GiB:.1f} GiB = {model.fixed_bytes / GiB:.1f} GiB fixed + "
        f"{model.per_token_bytes / KiB:.1f} KiB x {tokens:,} tokens ({model.source})"
    )
    import torch

    if torch.cuda.is_available():
        cap = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        text += f"; within this GPU's {cap / GiB:.0f} GiB: up to {model.max_tokens(cap):,} tokens per micro-batch"
    return text


# ---- fitting -------------------------------------------------------------------------------------------
@dataclass
class Fit:
    key: Tuple[str, str, int, bool, bool]
    model: MemoryModel
    points: List[Tuple[int, float, float]]  # (tokens, measured bytes, predicted bytes)
    refuted: List[int]  # token counts that ran out of memory although the model predicts they fit

    @property
    def max_rel_error(self) -> float:
        return max((abs(p - m) / m for _, m, p in self.points), default=math.nan)

    @property
    def rms_gib(self) -> float:
        return math.sqrt(sum((p - m) ** 2 for _, m, p in self.points) / len(self.points)) / GiB


def record_key(r: Dict[str, Any]) -> Tuple[str, str, int, bool, bool]:
    return (r["shape"], r["variant"], int(r["world_size"]), bool(r["activation_checkpointing"]), bool(r["compile"]))


def fit(
    records: Iterable[Dict[str, Any]], measure: str = "peak_reserved_GiB", capacity_GiB: Optional[float] = None
) -> Dict[Tuple, Fit]:
    """Least squares of `measure` (GiB) on tokens = seq_len x batch_size, per key (`record_key`). A key with
    one token count keeps the prior's per-token slope (given as record["prior_per_token_bytes"]) and fits the
    fixed part alone. Records with "oom": true are not fitted; with capacity_GiB each one is checked against
    the fit (a fit that says it fits is `refuted` there)."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(record_key(r), []).append(r)
    fits = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("oom") and r.get(measure) is not None]
        if not ok:
            continue
        x = np.array([float(r["seq_len"] * r["batch_size"]) for r in ok])
        y = np.array([float(r[measure]) * GiB for r in ok])
        if len(set(x.tolist())) >= 2:
            A = np.stack([np.ones_like(x), x], axis=1)
            (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        else:
            b = float(ok[0].get("prior_per_token_bytes", 0.0))
            a = float(np.mean(y - b * x))
        n_tok = len(set(x.tolist()))
        model = MemoryModel(float(a), float(b), "FITTED", f"fitted to {len(ok)} run(s) at {n_tok} size(s)")
        points = [(int(t), float(m), model.predict(t)) for t, m in zip(x, y)]
        refuted = []
        if capacity_GiB is not None:
            for r in rs:
                t = int(r["seq_len"] * r["batch_size"])
                if r.get("oom") and model.predict(t) <= capacity_GiB * GiB:
                    refuted.append(t)
        fits[key] = Fit(key, model, points, refuted)
    return fits


def table_lines(fits: Dict[Tuple, Fit], note: str = "") -> List[str]:
    """COEFFICIENTS entries (Python source) with each fit's error in its source string."""
    lines = []
    for key, f in sorted(fits.items()):
        src = f"{f.model.source}, max error {100 * f.max_rel_error:.1f}%, rms {f.rms_gib:.2f} GiB{note}"
        lines.append(f"    {key!r}: ({f.model.fixed_bytes / GiB:.3f}, {f.model.per_token_bytes / KiB:.3f}, {src!r}),")
    return lines


def report(fits: Dict[Tuple, Fit]) -> str:
    """Each key's coefficients and every record's measured vs predicted peak."""
    out = []
    for key, f in sorted(fits.items()):
        out.append(
            f"{key}: {f.model.fixed_bytes / GiB:.2f} GiB + {f.model.per_token_bytes / KiB:.2f} KiB/token "
            f"({f.model.source}); max error {100 * f.max_rel_error:.1f}%, rms {f.rms_gib:.2f} GiB"
            + (f"; REFUTED by OOM at {f.refuted} tokens" if f.refuted else "")
        )
        for t, m, p in f.points:
            out.append(f"    {t:>9,} tokens: measured {m / GiB:7.2f} GiB, fitted {p / GiB:7.2f} GiB")
    return "\n".join(out)
