"""Benchmark of the Triton DMS training-attention kernel (dms_flex/kernels/train_attention.py).

Modes
-----
(default, needs CUDA)  Forward + backward time (CUDA events around each step, median of --reps
    after warm-up) and peak extra memory (max allocated during one step minus what was allocated
    before it) of, side by side in one process:
      sdpa_causal   F.scaled_dot_product_attention(is_causal=True) with K/V expanded to the query
                    heads (as in bench_train_attention.py: the 2026-11-28 baseline numbers)
      sdpa_gqa      the same with enable_gqa=True (not in the default list)
      sdpa_flash    sdpa_causal restricted to SDPA's FlashAttention-2 backend (SDPBackend.FLASH_ATTENTION)
      sdpa_cudnn    sdpa_causal restricted to the cuDNN backend: with sdpa_flash, tells which
                    backend plain SDPA picked and how fast each is (FlashAttention-2 vs cuDNN)
      flex_causal   compiled flex_attention, causal block mask, enable_gqa
      flex_dms      dms_flex.attention.flex_dms_attention (naive: per-element bias gather, bias
                    gradient through per-element atomics)
      triton_dms    dms_flex.kernels.train_attention.dms_train_attention (this kernel)
    A DMS step includes the DMS terms (shift, relaxation with a fixed logistic noise sample) and
    the gradient into the decision logits. Before timing, triton_dms's output and gradients are
    checked against flex_dms on the same inputs (relative errors in the JSON and the table).
    Also per case: the kernel's forward alone and backward alone (ms, achieved TFLOP/s counting
    causal work as fwd 4*T*T/2*D*Hq*B flops, bwd 2.5x that).
    Default subset (~8 min on the H200 incl. compiles): B=1, T 8K and 32K, both head shapes,
    window 256. --all: T 4K/8K/16K/32K x B 1/4 x both shapes x windows 256/512 (long).
--sweep (CUDA)  Block sizes / warps / stages of each kernel at one shape per head dim (T=8K,
    B=1, w=256 by default): times each candidate of one kernel with the others at their
    defaults, then the atomic-dQ backward (dq_atomic) against the separate dQ kernel, then the
    pipeline depth of the masked loops; prints the best per kernel and the combined best against
    the default, and writes the suggested `_CONFIGS` entries to the JSON. --sweep-apply then
    runs the main table with the best configs as an extra variant triton_dms_tuned.
--aot (no GPU needed)  Compiles the real kernels offline for sm_90 (Triton + ptxas through a mock
    driver) and reports registers, spills, shared memory and wgmma counts; then traces the custom
    ops (forward and backward) on fake CUDA tensors through AOTAutograd, as torch.compile does.
    Prints one JSON line prefixed @@AOT@@. --aot-quick: default configs only (the test);
    --aot-candidates: every --sweep candidate too.
--cpu-smoke  The default pipeline at tiny shapes on CPU (host timers; CPU flex has no backward, so
    SDPA and the dense reference stand in for flex_causal and flex_dms). With TRITON_INTERPRET=1
    in the environment the kernel runs in Triton's interpreter, otherwise the public API's dense
    fallback. Checks the script's own logic; the numbers mean nothing.

Usage on the GPU machine (from the repository root):
    python benchmarks/bench_train_attention_kernel.py --out train_attn_kernel.json
    python benchmarks/bench_train_attention_kernel.py --sweep --out train_attn_sweep.json
    python benchmarks/bench_train_attention_kernel.py --all --variants triton_dms,sdpa_causal --out all.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from _bench_common import (
    add_triton_version,
    call_ms,
    fake_cuda_trace,
    finish_aot,
    log,
    make_recorder,
    median_ms,  # noqa: E402
    kernel_bench_device,
    raise_recompile_limits,
    rel_err,
    skip_aot,
    start_aot_report,
)
import torch.nn.functional as F  # noqa: E402

HEADS = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # Llama-3.2-1B, Llama-3-8B: (Hq, Hkv, D)
DEFAULT_VARIANTS = "sdpa_causal,flex_causal,flex_dms,triton_dms"
VARIANTS = (
    "sdpa_causal",
    "sdpa_gqa",
    "sdpa_flash",
    "sdpa_cudnn",
    "flex_causal",
    "flex_dms",
    "triton_dms",
    "triton_dms_tuned",
)


def parse_variants(text: str):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or [text]}: expected a comma list of {', '.join(VARIANTS)}"
        )
    return names


# --sweep candidates (BM, BN, warps, stages); all compile for sm_90 without spills (--aot-candidates)
SWEEP = {
    64: dict(
        fwd=[(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2)],
        dkdv=[(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2)],
        dq=[(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        dkdv_atomic=[(32, 128, 8, 3), (16, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],  # with dq_atomic
    ),
    128: dict(
        fwd=[(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
        dkdv=[(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (16, 64, 8, 3), (32, 64, 4, 3)],
        dq=[(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 16, 8, 3), (64, 32, 8, 3)],
        dkdv_atomic=[(16, 64, 8, 3), (16, 64, 8, 2)],
    ),
}


# ----------------------------------------------------------------------------------------------
# AOT mode
# ----------------------------------------------------------------------------------------------


def _ptxas_report(ck):
    import triton

    ptx = ck.asm["ptx"]
    row = dict(
        shared=int(ck.metadata.shared),
        num_warps=int(ck.metadata.num_warps),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
        ).stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    r = re.search(r"Used (\d+) registers", out)
    row.update(
        regs=int(r.group(1)) if r else -1,
        spill_stores=int(m.group(2)) if m else -1,
        spill_loads=int(m.group(3)) if m else -1,
    )
    return row


def _aot_compile_case(ta, report, D, doc, cfg, note, only=None):
    """Compile one config's kernels offline (those in `only`, default all); one report row each."""
    names = {ta._fwd_kernel: "fwd", ta._bwd_preprocess: "preprocess", ta._dkdv_kernel: "dkdv", ta._dq_kernel: "dq"}
    compiled = []
    Recorder = make_recorder(compiled, keep=lambda kern: only is None or names[kern] in only)
    B, Hq, Hkv, T = 1, 32, 8, 8192
    q = torch.empty(B, Hq, T, D, dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, T, D, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    lk = torch.empty(B, Hkv, T)
    ds = de = torch.empty(B, T, dtype=torch.int32) if doc else None
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T)
    if only is None or "fwd" in only:
        ta._launch_fwd(q, k, v, lk, ds, 256, D**-0.5, wrap=Recorder, interpret=False, cfg=cfg)
    if only is None or {"preprocess", "dkdv", "dq"} & set(only):
        ta._launch_bwd(q, q, k, v, lk, ds, de, out, lse, 256, D**-0.5, wrap=Recorder, interpret=False, cfg=cfg)
    for kern, _grid, kw, ck, dt in compiled:
        row = dict(
            kernel=names[kern],
            D=D,
            doc=doc,
            note=note,
            compile_s=round(dt, 2),
            block=[kw.get("BLOCK_M"), kw.get("BLOCK_N")],
            warps=kw.get("num_warps"),
            stages=kw.get("num_stages"),
        )
        row.update(_ptxas_report(ck))
        report["kernels"].append(row)


def _aot_compile_all(ta, report, quick, candidates):
    cases = [(128, True), (64, False)] if quick else [(64, False), (64, True), (128, False), (128, True)]
    for D, doc in cases:
        _aot_compile_case(ta, report, D, doc, None, "default")
    if not candidates:  # the atomic-dQ variant at the default blocks
        _aot_compile_case(ta, report, 64, True, {"dq_atomic": True}, "atomic dQ", only=("dkdv",))
        return
    for D, c in SWEEP.items():
        for kernel, cands in c.items():
            for cand in cands:
                if kernel == "dkdv_atomic":
                    _aot_compile_case(
                        ta, report, D, True, {"dkdv": cand, "dq_atomic": True}, "atomic dQ", only=("dkdv",)
                    )
                else:
                    _aot_compile_case(ta, report, D, True, {kernel: cand}, "candidate", only=(kernel,))


def _aot_trace(ta):
    """Fake-CUDA trace of the two custom ops (what AOTAutograd hands to inductor). Without a CUDA
    build, fake CUDA tensors cannot require grad or be viewed (both need the device guard), so the
    forward and backward ops are traced directly from precomputed document bounds; the
    autograd.Function around them and doc_bounds are checked under torch.compile on the GPU
    (tests/test_train_attention_kernel.py)."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Step(torch.nn.Module):
        def forward(self, q, k, v, logits, ds, de, go):
            lk = F.logsigmoid(-logits / 0.1)
            out, lse = ta._FWD_OP(q, k, v, lk, ds, 256, 0.125)
            dq, dk, dv, dlk = ta._BWD_OP(go, q, k, v, lk, ds, de, out, lse, 256, 0.125)
            return out, dq, dk, dv, dlk

    with FakeTensorMode():
        q = torch.empty(1, 8, 1024, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(1, 2, 1024, 64, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(1, 2, 1024, 64, dtype=torch.bfloat16, device="cuda")
        logits = torch.empty(1, 2, 1024, device="cuda")
        ds = torch.zeros(1, 1024, dtype=torch.int32, device="cuda")
        de = torch.zeros(1, 1024, dtype=torch.int32, device="cuda")
        args = (q, k, v, logits, ds, de, torch.empty_like(q))
        ep = torch.export.export(Step(), args)  # dynamo, fullgraph
        gm, _ = aot_export_module(Step(), args, trace_joint=False)
        saved = dict(ta._CONFIGS[64])
        ta._CONFIGS[64]["dq_atomic"] = True
        try:
            gm_atomic, _ = aot_export_module(Step(), args, trace_joint=False)
        finally:
            ta._CONFIGS[64] = saved
    n_atomic = gm_atomic.code.count("triton_kernel_wrapper_functional(")
    trace = dict(
        triton_calls=gm.code.count("triton_kernel_wrapper_functional("),  # fwd, preprocess, dkdv, dq
        triton_calls_dq_atomic=n_atomic,  # fwd, preprocess, dkdv
        export_has_ops=(
            "dms_flex.dms_train_attention_fwd" in str(ep.graph) and "dms_flex.dms_train_attention_bwd" in str(ep.graph)
        ),
    )
    trace["ok"] = trace["triton_calls"] == 4 and n_atomic == 3 and trace["export_has_ops"]
    return trace


def _aot_describe(row) -> str:
    return (
        f"{row['kernel']:10s} D={row['D']:3d} doc={row['doc']!s:5s} {row['note']:9s} block={row['block']} "
        f"w={row['warps']} s={row['stages']} regs={row['regs']} spill={row['spill_stores']}/{row['spill_loads']} "
        f"smem={row['shared']} wgmma={row['wgmma']} ({row['compile_s']} s)"
    )


def aot_main(quick: bool, candidates: bool):
    report = start_aot_report()
    if report is None:
        return 0
    from dms_flex.kernels import train_attention as ta

    if ta.interpreting():
        return skip_aot(report, "TRITON_INTERPRET=1 is set")
    _aot_compile_all(ta, report, quick, candidates)
    report["trace"] = fake_cuda_trace(lambda: _aot_trace(ta))
    return finish_aot(report, _aot_describe)


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_step(fn, dev, warmup, reps):
    """Median ms of fn() over reps (CUDA events; host clock on CPU) and peak extra MiB."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        fn()
        peak = float("nan")
    return median_ms(fn, dev, reps), peak


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------
def make_inputs(B, T, Hq, Hkv, D, dev, dtype, seed):
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, Hq, T, D, device=dev, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, D, device=dev, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, D, device=dev, generator=gen).to(dtype).requires_grad_()
    # decision logits around the relaxation's active range (alpha neither ~0 nor ~1 everywhere)
    logits = (torch.randn(B, Hkv, T, device=dev, generator=gen) * 0.3).requires_grad_()
    u = torch.rand(B, Hkv, T, device=dev, generator=gen).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    go = torch.randn(B, Hq, T, D, device=dev, generator=gen).to(dtype)
    return q, k, v, logits, noise, go


def build_variants(names, q, k, v, logits, noise, go, window, dev, flex_fn):
    from dms_flex import attention, decisions
    from dms_flex.config import DMSConfig
    from dms_flex.kernels import train_attention as ta

    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    cfg = DMSConfig(window=window)

    def log_keep():
        decided = decisions.shift_to_decided_token(logits)
        lk, _ = decisions.relax(decided, cfg, training=True, noise=noise)
        return lk

    bm = {}

    def block_mask():
        if "bm" not in bm:
            bm["bm"] = attention.make_block_mask(None, B, T, dev)
        return bm["bm"]

    def sdpa():
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
        return out, torch.autograd.grad(out, (q, k, v), go)

    def sdpa_gqa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out, torch.autograd.grad(out, (q, k, v), go)

    def sdpa_backend(backend):
        def fn():
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backend):
                return sdpa()

        return fn

    def flex_causal():
        if dev.type != "cuda":  # --cpu-smoke: CPU flex has no backward; stand-in
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = flex_fn(q, k, v, block_mask=block_mask(), enable_gqa=True)
        return out, torch.autograd.grad(out, (q, k, v), go)

    def flex_dms():
        if dev.type != "cuda":  # --cpu-smoke: the dense reference stands in
            out = attention.dms_attention(q, k, v, log_keep(), window, backend="dense")
        else:
            out = attention.flex_dms_attention(q, k, v, log_keep(), window, block_mask=block_mask())
        return out, torch.autograd.grad(out, (q, k, v, logits), go)

    def triton_dms():
        out = ta.dms_train_attention(q, k, v, log_keep(), window)
        return out, torch.autograd.grad(out, (q, k, v, logits), go)

    from torch.nn.attention import SDPBackend

    table = dict(
        sdpa_causal=sdpa,
        sdpa_gqa=sdpa_gqa,
        sdpa_flash=sdpa_backend(SDPBackend.FLASH_ATTENTION),
        sdpa_cudnn=sdpa_backend(SDPBackend.CUDNN_ATTENTION),
        flex_causal=flex_causal,
        flex_dms=flex_dms,
        triton_dms=triton_dms,
        triton_dms_tuned=triton_dms,
    )

    return {n: table[n] for n in names}


def kernel_split_times(q, k, v, logits, noise, go, window, dev, warmup, reps, cfg=None):
    """The Triton kernel's forward alone and backward alone (ms), from the launch functions."""
    from dms_flex.kernels import train_attention as ta

    lk = F.logsigmoid(-(logits.detach() + noise) / 0.1)
    scale = q.shape[-1] ** -0.5
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = ta._launch_fwd(qd, kd, vd, lk, None, window, scale, cfg=cfg)
    t_f, _ = time_step(lambda: ta._launch_fwd(qd, kd, vd, lk, None, window, scale, cfg=cfg), dev, warmup, reps)
    t_b, _ = time_step(
        lambda: ta._launch_bwd(go, qd, kd, vd, lk, None, None, out, lse, window, scale, cfg=cfg), dev, warmup, reps
    )
    return t_f, t_b


def causal_flops(B, T, Hq, D):
    fwd = 4.0 * B * Hq * D * T * T / 2
    return fwd, 2.5 * fwd


def run_case(B, T, heads, window, variants, dev, dtype, args, flex_fn, tuned=None):
    from dms_flex.kernels import train_attention as ta

    Hq, Hkv, D = HEADS[heads]
    row = dict(
        B=B, T=T, heads=heads, Hq=Hq, Hkv=Hkv, D=D, window=window, SxS_bf16_MiB=B * Hq * T * T * 2 / 2**20, results={}
    )
    q, k, v, logits, noise, go = make_inputs(B, T, Hq, Hkv, D, dev, dtype, seed=T + D + B)
    fns = build_variants(variants, q, k, v, logits, noise, go, window, dev, flex_fn)
    outs = {}
    for name, fn in fns.items():
        saved = None
        if name == "triton_dms_tuned" and tuned is not None:
            saved = {d: dict(c) for d, c in ta._CONFIGS.items()}
            for d, c in tuned.items():
                ta._CONFIGS[d].update(c)
        try:
            t_compile = time.perf_counter()
            res = fn()  # compile / warm
            _sync(dev)
            t_compile = time.perf_counter() - t_compile
            if name in ("flex_dms", "triton_dms") and not args.no_check:
                outs[name] = [res[0].detach().float()] + [g.detach().float() for g in res[1]]
            del res
            # long steps (naive flex DMS at 32K: ~0.6 s) get fewer repetitions
            one = t_compile if dev.type != "cuda" else call_ms(fn, dev) / 1e3
            warmup, reps = args.warmup, args.reps
            if one > 0.1:
                warmup, reps = 1, max(3, min(reps, 5))
            ms, peak = time_step(fn, dev, warmup, reps)
            row["results"][name] = dict(ms=ms, peak_extra_MiB=peak, first_call_s=round(t_compile, 2))
        except Exception as e:
            log(f"  {name} failed: {e!r}")
            row["results"][name] = dict(error=repr(e), tb=traceback.format_exc()[-2000:])
        finally:
            if saved is not None:
                for d, c in saved.items():
                    ta._CONFIGS[d] = c
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if "flex_dms" in outs and "triton_dms" in outs:
        names = ("out", "dq", "dk", "dv", "dlogits")
        row["check_vs_flex_dms"] = {n: rel_err(a, b) for n, a, b in zip(names, outs["triton_dms"], outs["flex_dms"])}
    outs.clear()
    if "triton_dms" in variants and not args.no_split:
        try:
            t_f, t_b = kernel_split_times(q, k, v, logits, noise, go, window, dev, args.warmup, args.reps)
            f_fl, b_fl = causal_flops(B, T, Hq, D)
            row["kernel_split"] = dict(fwd_ms=t_f, bwd_ms=t_b, fwd_TFLOPs=f_fl / t_f / 1e9, bwd_TFLOPs=b_fl / t_b / 1e9)
        except Exception as e:
            row["kernel_split"] = dict(error=repr(e))
    return row


def print_row(r):
    res = r["results"]
    base = res.get("sdpa_causal", {}).get("ms")
    fc = res.get("flex_causal", {}).get("ms")
    for name, x in res.items():
        if "ms" not in x:
            log(f"B={r['B']} T={r['T']} {r['heads']} w={r['window']} {name:16s} ERROR {x.get('error', '')[:100]}")
            continue
        s1 = f"{x['ms'] / base:5.2f}x sdpa" if base else ""
        s2 = f"{x['ms'] / fc:5.2f}x flex_causal" if fc else ""
        log(
            f"B={r['B']} T={r['T']} {r['heads']} w={r['window']} {name:16s} {x['ms']:9.2f} ms {s1:12s} {s2:18s} "
            f"peak +{x['peak_extra_MiB']:.0f} MiB"
        )
    if "check_vs_flex_dms" in r:
        errs = r["check_vs_flex_dms"]
        log("  triton_dms vs flex_dms rel. err: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    if "kernel_split" in r and "fwd_ms" in r["kernel_split"]:
        s = r["kernel_split"]
        log(
            f"  kernel alone: fwd {s['fwd_ms']:.2f} ms ({s['fwd_TFLOPs']:.0f} TFLOP/s causal), "
            f"bwd {s['bwd_ms']:.2f} ms ({s['bwd_TFLOPs']:.0f} TFLOP/s)"
        )


def summary_table(rows):
    """Short table: one line per case."""
    lines = [
        "| B | T | heads | w | sdpa ms | flex causal ms | flex DMS ms | triton DMS ms | x sdpa | x flex causal | "
        "x flex DMS | x sdpa flash-2 | x sdpa cudnn | peak MiB (triton) | max rel err vs flex DMS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(r, n):
        return r["results"].get(n, {}).get("ms")

    for r in rows:
        s, fc, fd, t = ms(r, "sdpa_causal"), ms(r, "flex_causal"), ms(r, "flex_dms"), ms(r, "triton_dms")
        tt = ms(r, "triton_dms_tuned")
        if tt is not None and (t is None or tt < t):
            t = tt

        def f(x):
            return f"{x:.2f}" if x is not None else "-"

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b is not None else "-"

        peak = r["results"].get("triton_dms", {}).get("peak_extra_MiB")
        err = max(r["check_vs_flex_dms"].values()) if "check_vs_flex_dms" in r else None
        lines.append(
            f"| {r['B']} | {r['T']} | {r['heads']} | {r['window']} | {f(s)} | {f(fc)} | {f(fd)} | {f(t)} | "
            f"{ratio(t, s)} | {ratio(t, fc)} | {ratio(t, fd)} | {ratio(t, ms(r, 'sdpa_flash'))} | "
            f"{ratio(t, ms(r, 'sdpa_cudnn'))} | {f(peak)} | "
            f"{'-' if err is None else f'{err:.1e}'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------
def _sweep_candidates(res, heads, T, D, t_fwd, t_bwd):
    """Each kernel's candidates with the others at their defaults; then dkdv with the atomic dQ."""
    for kernel, timer in (("fwd", t_fwd), ("dkdv", t_bwd), ("dq", t_bwd)):
        for cand in SWEEP[D][kernel]:
            try:
                ms = timer({kernel: cand})
                res[kernel].append(dict(cfg=list(cand), ms=ms))
                log(f"[sweep {heads} T={T}] {kernel:4s} {cand} {ms:.3f} ms")
            except Exception as e:
                res[kernel].append(dict(cfg=list(cand), error=repr(e)))
                log(f"[sweep {heads} T={T}] {kernel:4s} {cand} failed: {e!r}")
    res["dkdv_atomic"] = []
    for cand in SWEEP[D]["dkdv_atomic"]:
        try:
            ms = t_bwd({"dkdv": cand, "dq_atomic": True})
            res["dkdv_atomic"].append(dict(cfg=list(cand), ms=ms))
            log(f"[sweep {heads} T={T}] dkdv+atomic dQ {cand} {ms:.3f} ms")
        except Exception as e:
            res["dkdv_atomic"].append(dict(cfg=list(cand), error=repr(e)))
            log(f"[sweep {heads} T={T}] dkdv+atomic dQ {cand} failed: {e!r}")


def _sweep_pick(res, heads, T, t_fwd, t_bwd):
    """The best candidate per kernel; atomic dQ if it beats the separate dQ kernel; then the pipeline
    depth of the masked loops at those blocks."""
    best = {}
    for kernel in ("fwd", "dkdv", "dq"):
        ok = [r for r in res[kernel] if "ms" in r]
        if ok:
            best[kernel] = tuple(min(ok, key=lambda r: r["ms"])["cfg"])
    ok = [r for r in res["dkdv_atomic"] if "ms" in r]
    if ok and "dkdv" in best and "dq" in best:
        atomic = min(ok, key=lambda r: r["ms"])
        t_sep = t_bwd(dict(best))
        res["bwd_separate_dq_ms"] = t_sep
        res["bwd_atomic_dq_ms"] = atomic["ms"]
        log(f"[sweep {heads} T={T}] backward: separate dQ kernel {t_sep:.3f} ms, atomic dQ {atomic['ms']:.3f} ms")
        if atomic["ms"] < t_sep:
            best["dkdv"] = tuple(atomic["cfg"])
            best["dq_atomic"] = True
    for ms_ in (1, 2, 3):
        cfg = dict(best, masked_stages=ms_)
        try:
            t = t_fwd(cfg) + t_bwd(cfg)
            res["masked_stages"].append(dict(masked_stages=ms_, ms=t))
            log(f"[sweep {heads} T={T}] best blocks, masked_stages={ms_}: fwd+bwd {t:.3f} ms")
        except Exception as e:
            res["masked_stages"].append(dict(masked_stages=ms_, error=repr(e)))
    ok = [r for r in res["masked_stages"] if "ms" in r]
    if ok:
        best["masked_stages"] = min(ok, key=lambda r: r["ms"])["masked_stages"]
    return best


def _sweep_one(heads, dev, dtype, args):
    """Sweep of one head shape; returns the results dict (best config under 'best')."""
    from dms_flex.kernels import train_attention as ta

    Hq, Hkv, D = HEADS[heads]
    T, B, w = args.sweep_seq, 1, args.sweep_window
    q, k, v, logits, noise, go = make_inputs(B, T, Hq, Hkv, D, dev, dtype, seed=1)
    f_fl, b_fl = causal_flops(B, T, Hq, D)
    default = ta.default_config(D, dtype)
    res = dict(
        default={k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in default.items()},
        fwd=[],
        dkdv=[],
        dq=[],
        masked_stages=[],
    )
    lk = F.logsigmoid(-(logits.detach() + noise) / 0.1)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    scale = D**-0.5
    out_, lse = ta._launch_fwd(qd, kd, vd, lk, None, w, scale)

    def t_fwd(cfg):
        return time_step(lambda: ta._launch_fwd(qd, kd, vd, lk, None, w, scale, cfg=cfg), dev, 2, args.reps)[0]

    def t_bwd(cfg):
        return time_step(
            lambda: ta._launch_bwd(go, qd, kd, vd, lk, None, None, out_, lse, w, scale, cfg=cfg), dev, 2, args.reps
        )[0]

    _sweep_candidates(res, heads, T, D, t_fwd, t_bwd)
    best = _sweep_pick(res, heads, T, t_fwd, t_bwd)
    t_def = t_fwd(None) + t_bwd(None)
    t_best = t_fwd(best) + t_bwd(best)
    res["best"] = {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in best.items()}
    res["default_ms"] = t_def
    res["best_ms"] = t_best
    res["best_TFLOPs"] = (f_fl + b_fl) / t_best / 1e9
    log(f"[sweep {heads}] default fwd+bwd {t_def:.3f} ms, best {t_best:.3f} ms: {best}")
    return res


def sweep(dev, dtype, args):
    out = {}
    for heads in args.heads.split(","):
        out[HEADS[heads][2]] = _sweep_one(heads, dev, dtype, args)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _meta(args, dev):
    from dms_flex.kernels import train_attention as ta

    meta = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        dtype=args.dtype,
        argv=sys.argv[1:],
    )
    add_triton_version(meta)
    meta["configs"] = {
        str(d): {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()} for d, c in ta._CONFIGS.items()
    }
    meta["interpreter"] = ta.interpreting()
    return meta


def _grid(args):
    """(seqs, batches, windows) of the table; --cpu-smoke and --all also set the head shapes."""
    global HEADS
    if args.cpu_smoke:
        HEADS = {"1b": (4, 2, 16), "8b": (4, 1, 32)}
        args.heads = "1b,8b"
        return [96], [1], [5]
    if args.all:
        args.heads = "1b,8b"
        return [4096, 8192, 16384, 32768], [1, 4], [256, 512]
    return args.seq, args.batch, args.window


def _run_sweep(out, dev, dtype, args):
    """--sweep: the best config per head dim (what --sweep-apply runs as triton_dms_tuned)."""
    if dev.type != "cuda":  # --cpu-smoke --sweep: the sweep's logic at tiny shapes (interpreter)
        HEADS.update({"1b": (2, 1, 64), "8b": (2, 1, 128)})
        args.sweep_seq, args.sweep_window = 80, 20
    out["sweep"] = sweep(dev, dtype, args)
    tuned = {D: r["best"] for D, r in out["sweep"].items() if r.get("best")}
    log("suggested _CONFIGS entries: " + json.dumps({str(d): c for d, c in tuned.items()}))
    return tuned


def bench_main(args):
    dev = kernel_bench_device(args.cpu_smoke)
    if dev is None:
        return 2
    dtype = getattr(torch, args.dtype)
    meta = _meta(args, dev)
    seqs, batches, windows = _grid(args)

    from torch.nn.attention.flex_attention import flex_attention

    if dev.type == "cuda":
        raise_recompile_limits()
        flex_fn = torch.compile(flex_attention, dynamic=False)
    else:
        flex_fn = flex_attention

    out = dict(meta=meta, rows=[])
    tuned = None
    if args.sweep:
        tuned = _run_sweep(out, dev, dtype, args)
        if not args.sweep_apply:
            _write(out, args)
            return 0
    variants = list(args.variants)
    if tuned is not None and "triton_dms_tuned" not in variants:
        variants.append("triton_dms_tuned")

    for heads in args.heads.split(","):
        for T in seqs:
            for B in batches:
                for w in windows:
                    log(f"[case B={B} T={T} {heads} w={w}]")
                    r = run_case(B, T, heads, w, variants, dev, dtype, args, flex_fn, tuned)
                    out["rows"].append(r)
                    print_row(r)
                    _write(out, args)  # keep partial results if a later case dies
    table = summary_table(out["rows"])
    out["table"] = table
    _write(out, args)
    print(table, flush=True)
    return 0


def _write(out, args):
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--heads", default="1b,8b", help="comma list of 1b (32,8,64) and 8b (32,8,128)")
    ap.add_argument("--window", type=int, nargs="+", default=[256])
    ap.add_argument("--all", action="store_true", help="T 4K-32K x B 1,4 x both heads x w 256,512")
    ap.add_argument(
        "--variants",
        default=parse_variants(DEFAULT_VARIANTS),
        type=parse_variants,
        help="comma list of " + ", ".join(VARIANTS),
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-check", action="store_true", help="skip the triton_dms vs flex_dms comparison")
    ap.add_argument("--no-split", action="store_true", help="skip the kernel-alone fwd / bwd timings")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-apply", action="store_true", help="after --sweep, run the table with the best configs")
    ap.add_argument("--sweep-seq", type=int, default=8192)
    ap.add_argument("--sweep-window", type=int, default=256)
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--aot-quick", action="store_true")
    ap.add_argument("--aot-candidates", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if "triton_dms_tuned" in args.variants and not (args.sweep and args.sweep_apply):
        ap.error("--variants triton_dms_tuned needs --sweep --sweep-apply (its configs are the sweep's best)")
    if args.aot:
        return aot_main(args.aot_quick, args.aot_candidates)
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
