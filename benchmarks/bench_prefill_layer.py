"""One attention layer of a first prefill, SmolLM2-135M shapes: where the time goes.

9 query heads, 3 KV heads, head dim 64, random q/k/v (bf16 on CUDA, float32 on CPU), random eviction
marks (each (row, KV head, token) marked with probability --evict-frac), window --window. Per shape
BxT (--shapes), each variant is timed after --warmup untimed calls as the median of --repeats calls
(CUDA events around the call; perf_counter on CPU), and printed in ms and as a ratio to sdpa_causal:

- sdpa_causal          F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True): the floor;
- flex_causal          compiled flex_attention with a plain causal block mask (built once, not timed);
- dms_hard_attention   dms_flex.attention.dms_hard_attention(q, k, v, evicted, window): the public
                       first-prefill entry (attention only);
- cache_append         a first prefill through dms_flex.cache.DMSKVCache.append (capacity T): the hard-rule
                       attention plus the bookkeeping and the packing of the survivors into the slots.
                       Decision logit t decides token t-1, so logits[..., t] = +1 where token t-1 is marked,
                       -1 elsewhere (logit 0 decides nothing in a first prefill); cache.reset() between
                       calls, outside the timed span;
- cache_append_chunk2  the second half (T/2 tokens) appended onto a cache already holding a first prefill
                       of the first T/2 tokens (a later turn, or the second chunk of a prompt); the first
                       half is re-appended before each call, outside the timed span;
- legacy_mask_build / legacy_mask_build_compiled / legacy_flex_mask: the old way, create_block_mask of
                       dms_flex.masks.generate_dms_hard_mask (uncompiled, then _compile=True) and compiled
                       flex_attention with that mask (attention only); legacy_total = compiled build +
                       attention (a sum, not timed). Skipped with a message when it fails (e.g. out of memory:
                       the uncompiled build materialises B x 9 x T x T).

The output of cache_append is compared with dms_hard_attention's (same marks: the last token's mark
never matters in a first prefill) and the max abs difference printed. On CPU (a smoke test: e.g.
--device cpu --shapes 2x256) flex runs uncompiled and is skipped with a message if it fails.

    python3 benchmarks/bench_prefill_layer.py --out prefill_layer.json              # H200: 16x7000 1x32768
    python3 benchmarks/bench_prefill_layer.py --device cpu --shapes 2x256 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import git, log, raise_recompile_limits, time_ms, write_json  # noqa: E402

HQ, HKV, D = 9, 3, 64
VARIANTS = (
    "sdpa_causal",
    "flex_causal",
    "dms_hard_attention",
    "cache_append",
    "cache_append_chunk2",
    "legacy_flex_mask",
)


def parse_shape(text: str):
    """'16x7000' -> (16, 7000)."""
    b, sep, t = text.lower().partition("x")
    try:
        B, T = int(b), int(t)
    except ValueError:
        B = T = 0
    if not sep or B < 1 or T < 2:
        raise argparse.ArgumentTypeError(f"expected BxT with B >= 1 and T >= 2 (e.g. 16x7000), got {text!r}")
    return B, T


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench_prefill_layer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[(16, 7000), (1, 32768)], metavar="BxT")
    p.add_argument("--evict-frac", type=_fraction, default=0.85, help="fraction of tokens marked for eviction")
    p.add_argument("--window", type=_int_at_least(0), default=256)
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        metavar="VARIANT",
        help=f"any of {', '.join(VARIANTS)} (default: all)",
    )
    p.add_argument("--repeats", type=_int_at_least(1), default=10)
    p.add_argument("--warmup", type=_int_at_least(0), default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), help="torch.set_num_threads (CPU runs)")
    p.add_argument("--out", help="write the results (meta + rows) as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return args


# ================================================================================ the variants
def make_inputs(B, T, frac, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, HKV, T, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, HKV, T, D, generator=g).to(device=device, dtype=dtype)
    evicted = (torch.rand(B, HKV, T, generator=g) < frac).to(device)
    # logit t decides token t-1: +1 where that token is marked, -1 elsewhere; logit 0 decides nothing here
    logits = torch.full((B, HKV, T), -1.0, device=device)
    logits[..., 1:] = torch.where(evicted[..., :-1], 1.0, -1.0)
    return q, k, v, evicted, logits


class ShapeRun:
    """The rows of one BxT shape: each variant timed (or skipped with the reason), outputs kept for the
    comparison."""

    def __init__(self, B, T, args, device):
        from torch.nn.attention.flex_attention import flex_attention

        self.B, self.T, self.args, self.device = B, T, args, device
        self.cuda = device.type == "cuda"
        self.flex = torch.compile(flex_attention) if self.cuda else flex_attention
        self.rows: List[Dict] = []
        self.outputs: Dict[str, torch.Tensor] = {}
        self.wanted = set(args.variants)
        self.wanted.add("sdpa_causal")  # comparisons always have the floor

    def record(self, variant, times=None, skipped=None, **extra):
        row = {"B": self.B, "T": self.T, "variant": variant, **extra}
        if times is not None:
            row.update(ms=statistics.median(times), ms_min=min(times), ms_all=times)
        if skipped is not None:
            row["skipped"] = skipped
            log(f"  {self.B}x{self.T} {variant}: skipped ({skipped})")
        self.rows.append(row)

    def attempt(self, variant, fn, setup=None, repeats=None, warmup=None, keep=False, **extra):
        if variant not in self.wanted:
            return
        args = self.args
        try:
            times = time_ms(fn, self.device, repeats or args.repeats, args.warmup if warmup is None else warmup, setup)
        except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
            self.record(variant, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            if self.cuda:
                torch.cuda.empty_cache()
            return
        self.record(variant, times, **extra)
        if keep:
            if setup is not None:
                setup()
            self.outputs[variant] = fn().float()


def _flex_causal(run: ShapeRun, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask

    from dms_flex import masks

    try:
        bm = create_block_mask(masks.causal_mask_mod, run.B, None, run.T, run.T, device=run.device)
    except Exception as e:  # noqa: BLE001
        run.record("flex_causal", skipped=f"causal block mask failed: {type(e).__name__}: {e}")
    else:
        run.attempt("flex_causal", lambda: run.flex(q, k, v, block_mask=bm, enable_gqa=True), compiled=run.cuda)


def _cache_append(run: ShapeRun, q, k, v, logits, dtype):
    from dms_flex.cache import DMSKVCache, masked_attention

    B, T, device = run.B, run.T, run.device
    cache = DMSKVCache(B, HKV, D, capacity=T, window=run.args.window, dtype=dtype, device=device)
    pos0 = torch.zeros(B, dtype=torch.long, device=device)
    n_all = torch.full((B,), T, dtype=torch.long, device=device)
    run.attempt(
        "cache_append",
        lambda: cache.append(q, k, v, logits, pos0, n_all, attend=masked_attention),
        setup=cache.reset,
        keep=True,
    )
    if "cache_append" in run.outputs:
        run.rows[-1]["live_fraction"] = float(cache.length.float().mean()) / T


def _cache_append_chunk2(run: ShapeRun, q, k, v, logits, dtype):
    from dms_flex.cache import DMSKVCache, masked_attention

    B, T, device = run.B, run.T, run.device
    h = T // 2
    halves = [(x[:, :, :h].contiguous(), x[:, :, h:].contiguous()) for x in (q, k, v)]
    (q1, q2), (k1, k2), (v1, v2) = halves
    l1, l2 = logits[..., :h].contiguous(), logits[..., h:].contiguous()  # l2[..., 0] decides token h-1
    cache = DMSKVCache(B, HKV, D, capacity=T, window=run.args.window, dtype=dtype, device=device)
    zeros = torch.zeros(B, dtype=torch.long, device=device)
    first_n = torch.full((B,), h, dtype=torch.long, device=device)
    second_n = torch.full((B,), T - h, dtype=torch.long, device=device)

    def first_half():
        cache.reset()
        cache.append(q1, k1, v1, l1, zeros, first_n, attend=masked_attention)

    run.attempt(
        "cache_append_chunk2",
        lambda: cache.append(q2, k2, v2, l2, first_n, second_n, attend=masked_attention),
        setup=first_half,
        new_tokens=T - h,
        cached_before=h,
    )


def _legacy_flex_mask(run: ShapeRun, q, k, v, evicted):
    from torch.nn.attention.flex_attention import create_block_mask

    from dms_flex import masks

    B, T, args = run.B, run.T, run.args
    mask_mod = masks.generate_dms_hard_mask(evicted, args.window, HQ // HKV)
    built = {}

    def build(compiled):
        def fn():
            built["bm"] = create_block_mask(mask_mod, B, HQ, T, T, device=run.device, _compile=compiled)
            return built["bm"]

        return fn

    run.wanted.update({"legacy_mask_build", "legacy_mask_build_compiled"})
    # the uncompiled build is slow (and large): a few calls
    run.attempt("legacy_mask_build", build(False), repeats=min(args.repeats, 3), warmup=min(args.warmup, 1))
    bm = built.pop("bm", None)
    if run.cuda:
        bm = None  # free it before the compiled build
        torch.cuda.empty_cache()
        run.attempt("legacy_mask_build_compiled", build(True))
        bm = built.pop("bm", None)
    else:
        run.record("legacy_mask_build_compiled", skipped="not compiled on CPU (smoke test)")
    if bm is not None:
        run.attempt("legacy_flex_mask", lambda: run.flex(q, k, v, block_mask=bm, enable_gqa=True), compiled=run.cuda)
    else:
        run.record("legacy_flex_mask", skipped="no block mask (its build failed)")
    bm = None
    byv = {r["variant"]: r for r in run.rows if "ms" in r}
    build_row = byv.get("legacy_mask_build_compiled") or byv.get("legacy_mask_build")
    if build_row is not None and "legacy_flex_mask" in byv:
        total = build_row["ms"] + byv["legacy_flex_mask"]["ms"]
        run.rows.append(
            {
                "B": B,
                "T": T,
                "variant": "legacy_total",
                "ms": total,
                "note": f"{build_row['variant']} + legacy_flex_mask (sum of medians)",
            }
        )


def _compare(run: ShapeRun):
    """Ratios to sdpa_causal, and cache_append's output against dms_hard_attention's."""
    rows, outputs = run.rows, run.outputs
    base = next((r["ms"] for r in rows if r["variant"] == "sdpa_causal" and "ms" in r), None)
    for r in rows:
        if "ms" in r and base:
            r["x_sdpa"] = r["ms"] / base
    if "dms_hard_attention" in outputs and "cache_append" in outputs:
        diff = (outputs["dms_hard_attention"] - outputs["cache_append"]).abs().max().item()
        for r in rows:
            if r["variant"] == "cache_append":
                r["max_abs_diff_vs_dms_hard_attention"] = diff
        print(f"{run.B}x{run.T}: cache_append vs dms_hard_attention outputs: max abs diff {diff:.3g}")


def run_shape(B, T, args, device, dtype) -> List[Dict]:
    from dms_flex import attention

    q, k, v, evicted, logits = make_inputs(B, T, args.evict_frac, dtype, device, args.seed)
    run = ShapeRun(B, T, args, device)
    run.attempt("sdpa_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    if "flex_causal" in run.wanted:
        _flex_causal(run, q, k, v)
    run.attempt("dms_hard_attention", lambda: attention.dms_hard_attention(q, k, v, evicted, args.window), keep=True)
    if "cache_append" in run.wanted:
        _cache_append(run, q, k, v, logits, dtype)
    if "cache_append_chunk2" in run.wanted:
        _cache_append_chunk2(run, q, k, v, logits, dtype)
    if "legacy_flex_mask" in run.wanted:
        _legacy_flex_mask(run, q, k, v, evicted)
    _compare(run)
    return run.rows


# ================================================================================ main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        raise_recompile_limits(256, accumulated=None)
    else:
        import warnings

        log("CPU: a smoke test; flex_attention runs uncompiled")
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    import warnings

    warnings.filterwarnings("ignore", message="_compile flag on create_block_mask", category=DeprecationWarning)
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "heads": {"q": HQ, "kv": HKV, "head_dim": D},
        "dtype": str(dtype).replace("torch.", ""),
        "window": args.window,
        "evict_frac": args.evict_frac,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": "median of repeats after warm-up; CUDA events (perf_counter on CPU); set-up outside",
    }
    result = {"meta": meta, "rows": []}
    print(
        f"{meta['device']}, {meta['dtype']}, heads {HQ}/{HKV} x {D}, window {args.window}, "
        f"evict fraction {args.evict_frac}"
    )
    print(f"{'shape':>10s}  {'variant':>27s}  {'ms':>10s}  {'x sdpa':>7s}")
    for B, T in args.shapes:
        with torch.no_grad():
            rows = run_shape(B, T, args, device, dtype)
        for r in rows:
            ms = f"{r['ms']:.3f}" if "ms" in r else "skipped"
            ratio = f"{r['x_sdpa']:.2f}" if "x_sdpa" in r else "-"
            print(f"{f'{B}x{T}':>10s}  {r['variant']:>27s}  {ms:>10s}  {ratio:>7s}", flush=True)
        result["rows"].extend(rows)
        if args.out:
            write_json(args.out, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, result)
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
