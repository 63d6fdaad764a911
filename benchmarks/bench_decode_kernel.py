"""Benchmark of dms_flex's decode attention kernel on the compact KV cache.

Modes
-----
(default, needs CUDA)  In one process: device-to-device copy bandwidth (bytes read + written /
    time) as the ceiling; our Triton kernel at Llama-3-8B heads (32 q, 8 kv, D 128) and
    Llama-3.2-1B heads (32 q, 8 kv, D 64) for B=8 ctx 32K, B=64 ctx 8K, B=1 ctx 128K at
    compression ratio CR 1, 2, 4, 8 (live length ctx/CR, capacity ctx/CR; --ragged: lengths
    drawn within +-10% of ctx/CR, capacity the maximum); against dense SDPA (enable_gqa, full ctx
    cache), SDPA on the compact cache without a mask (meaningful for uniform lengths only),
    compiled FlexAttention on the compact cache with a per-(b, h) length block mask, and flex with
    the queries regrouped as (B*Hkv, 1, G, D). Every method is timed as a CUDA graph of calls over
    several rotated input sets (so L2 holds none of them and launch gaps vanish), median of
    replays. Before timing, each method's output is checked against the reference.
    Prints a table; writes JSON to --out (default: stdout, after the table).
--sweep (CUDA)  Block-size / warps / stages / split-size sweep at a few shapes, to tune defaults.
--aot (no GPU needed)  Compiles the real kernels offline for sm_90 (Triton + ptxas, through a mock
    driver) at representative configs and reports registers, spills, shared memory, tensor-core
    and cp.async instruction counts; then traces the triton_op decomposition on fake CUDA tensors
    (what torch.compile / inductor sees). Prints one JSON line prefixed @@AOT@@.
--cpu-smoke  Runs the default pipeline on CPU at tiny shapes (reference instead of the kernel,
    eager flex, host timers) to check the script's own logic; numbers mean nothing.

Usage on the GPU machine (from the repository root):
    python benchmarks/bench_decode_kernel.py --out bench_decode.json
    python benchmarks/bench_decode_kernel.py --quick --out bench_decode_quick.json
    python benchmarks/bench_decode_kernel.py --sweep --out bench_decode_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

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
    make_recorder,  # noqa: E402
    kernel_bench_device,
    raise_recompile_limits,
    rel_err,
    skip_aot,
    start_aot_report,
)
import torch.nn.functional as F  # noqa: E402

MODELS = {"llama3-8b": dict(Hq=32, Hkv=8, D=128), "llama3.2-1b": dict(Hq=32, Hkv=8, D=64)}
SHAPES = [(8, 32768), (64, 8192), (1, 131072)]  # (B, ctx)
CRS = [1, 2, 4, 8]
SWEEP_MODELS = {**MODELS, "smollm2-135m": dict(Hq=9, Hkv=3, D=64)}


# ----------------------------------------------------------------------------------------------
# AOT mode: compile for sm_90 without a GPU
# ----------------------------------------------------------------------------------------------


def _kernel_report(ck):
    import re
    import subprocess
    import tempfile

    import triton

    ptx = ck.asm["ptx"]
    row = dict(
        shared=int(ck.metadata.shared),
        num_warps=int(ck.metadata.num_warps),
        num_stages=int(getattr(ck.metadata, "num_stages", -1)),
        mma=len(re.findall(r"\bw?g?mma\.", ptx)),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
        vec_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
        scalar_b16_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\b", ptx)),
        # one byte at a time from shared memory: an int8 tile converted after its move into the dot's layout
        byte_shared_loads=len(re.findall(r"ld\.shared(?:\.\w+)*\.[bsu]8\b", ptx)),
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m:
        row.update(regs=int(m.group(1)), stack=int(m.group(2)), local_bytes=int(m.group(4)))
    else:
        row.update(regs=-1, stack=-1, local_bytes=-1, cuobjdump=res[-500:])
    return row


def _aot_configs(quick: bool):
    """(dtype, D, G, B, C, quant, note[, launch kwargs]); C chosen so the auto split gives the intended path."""
    configs = [
        ("bfloat16", 128, 4, 8, 4096, False, "8B heads, multi-split"),
        ("bfloat16", 64, 4, 8, 4096, False, "1B heads, multi-split"),
        ("bfloat16", 128, 4, 64, 256, False, "single split (no merge)"),
        ("float32", 128, 4, 2, 2048, False, "fp32 (ieee dot)"),
        ("bfloat16", 128, 4, 8, 4096, True, "int8 cache, bf16 q"),
        ("bfloat16", 128, 4, 16, 4224, True, "int8, long streams, fp16 dots (impure PTX)", dict(f16="asm")),
        ("bfloat16", 128, 4, 16, 4224, True, "int8, long streams, fp16 dots (pure PTX)", dict(f16="asm_pure")),
    ]
    if not quick:
        configs += [
            ("float16", 128, 4, 8, 4096, False, "fp16"),
            ("bfloat16", 128, 1, 8, 4096, False, "G=1"),
            ("bfloat16", 128, 8, 8, 4096, False, "G=8"),
            ("bfloat16", 96, 4, 8, 4096, False, "D=96"),
            ("float16", 64, 4, 8, 4096, True, "int8 cache, fp16 q, D=64"),
            ("float32", 128, 4, 8, 4096, True, "int8 cache, fp32 q"),
        ]
    return configs


def _aot_inputs(dtype, D, G, B, C, quant, Hkv=8):
    """CPU tensors of one config's shapes: (q, k, v, L, k_scale, v_scale)."""
    q = torch.randn(B, Hkv * G, D).to(dtype)
    if quant:
        k = torch.zeros(B, Hkv, C, D, dtype=torch.int8)
        v = torch.zeros(B, Hkv, C, D, dtype=torch.int8)
        ks = torch.ones(B, Hkv, C)
        vs = torch.ones(B, Hkv, C)
    else:
        k = torch.empty(B, Hkv, C, D, dtype=dtype)
        v = torch.empty(B, Hkv, C, D, dtype=dtype)
        ks = vs = None
    L = torch.full((B, Hkv), C, dtype=torch.int32)
    return q, k, v, L, ks, vs


def _aot_compile(dk, configs, report):
    """Compile the split (and merge) kernels of each config offline; one report row per kernel."""
    compiled = []
    Recorder = make_recorder(compiled)
    for dtype_name, D, G, B, C, quant, note, *extra in configs:
        kw = extra[0] if extra else {}
        q, k, v, L, ks, vs = _aot_inputs(getattr(torch, dtype_name), D, G, B, C, quant)
        n0 = len(compiled)
        t0 = time.perf_counter()
        dk._launch(q, k, v, L, None, None, ks, vs, wrap=Recorder, sm_count=132, interpret=False, **kw)
        dt = time.perf_counter() - t0
        for kern, grid, _kw, ck, _dt in compiled[n0:]:
            name = "split" if kern is dk._decode_split_kernel else "merge"
            row = dict(
                kernel=name,
                config=note,
                dtype=dtype_name,
                D=D,
                G=G,
                B=B,
                C=C,
                quant=quant,
                launch=kw,
                grid=list(grid),
                compile_s=round(dt, 2),
            )
            row.update(_kernel_report(ck))
            report["kernels"].append(row)


def _aot_trace(dk):
    """Fake-CUDA trace of the triton_op decomposition (what AOTAutograd hands to inductor)."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    dk._sm_count = lambda i: 132  # no CUDA runtime here

    class Step(torch.nn.Module):
        def forward(self, q, k, v, L):
            return (dk.decode_attention(q, k, v, L) * 2.0,)

    with FakeTensorMode():
        q = torch.empty(8, 32, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(8, 8, 4096, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(8, 8, 4096, 128, dtype=torch.bfloat16, device="cuda")
        L = torch.empty(8, 8, dtype=torch.int32, device="cuda")
        ep = torch.export.export(Step(), (q, k, v, L))  # dynamo, fullgraph
        gm, _ = aot_export_module(Step(), (q, k, v, L), trace_joint=False)
    code = gm.code
    return dict(
        ok="triton_kernel_wrapper_functional" in code,
        export_has_op="dms_flex.decode_attention" in str(ep.graph),
        triton_calls=code.count("triton_kernel_wrapper_functional("),
    )


def _aot_describe(row) -> str:
    return (
        f"{row['kernel']:5s} {row['config']:28s} grid={row['grid']} regs={row['regs']} local={row['local_bytes']} "
        f"smem={row['shared']} mma={row['mma']} cp.async={row['cp_async']} v-loads={row['vec_loads']} "
        f"b16-loads={row['scalar_b16_loads']} shared-b8-loads={row['byte_shared_loads']}"
    )


def aot_main(quick: bool):
    report = start_aot_report()
    if report is None:
        return 0
    from dms_flex.kernels import decode as dk

    if dk._is_interpreted(dk._decode_split_kernel):
        return skip_aot(report, "TRITON_INTERPRET=1 is set")
    _aot_compile(dk, _aot_configs(quick), report)
    report["trace"] = fake_cuda_trace(lambda: _aot_trace(dk))
    return finish_aot(report, _aot_describe)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def time_fns(fns, device, reps=25, min_span_ms=2.0):
    """Median seconds per call of a list of zero-arg callables (one per rotated input set).

    CUDA: capture all calls in one CUDA graph; replay it n times between two events (n chosen so
    a span lasts >= min_span_ms); median over `reps` spans, divided by n * len(fns). Falls back to
    events around eager calls if capture fails. CPU: host timer.
    """
    if device.type != "cuda":
        for f in fns:
            f()
        ts = []
        for _ in range(max(3, reps // 5)):
            t0 = time.perf_counter()
            for f in fns:
                f()
            ts.append((time.perf_counter() - t0) / len(fns))
        return statistics.median(ts), "host"

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        run = g.replay
    except Exception as e:  # pragma: no cover - depends on the method
        log(f"  graph capture failed ({e!r}); timing eager calls")
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for f in fns:
                f()

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    run()
    e1.record()
    e1.synchronize()
    one = max(e0.elapsed_time(e1), 1e-3)
    n = max(1, min(200, int(math.ceil(min_span_ms / one))))
    ts = []
    for _ in range(reps):
        e0.record()
        for _ in range(n):
            run()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3 / (n * len(fns)))
    return statistics.median(ts), mode


def copy_bandwidth(device, nbytes=4 << 30):
    """Device-to-device copy of a 4 GiB buffer, bytes read + written over time. Timed both as a
    graph replay (a memcpy node) and as eager copies between events; the faster is the ceiling
    (the graph's memcpy node measured ~2.8 TB/s on the H200 where eager copies reach ~4.3)."""
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t, mode = time_fns([lambda: dst.copy_(src)], device, reps=25)
    if device.type == "cuda":
        for _ in range(3):
            dst.copy_(src)
        t_eager = statistics.median(call_ms(lambda: dst.copy_(src), device) / 1e3 for _ in range(15))
        if t_eager < t:
            t, mode = t_eager, "eager events"
    bw = 2 * src.numel() * src.element_size() / t
    src = dst = None  # noqa: F841 (free before the cases allocate)
    return bw, t, mode


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
_FLEX = {}


def _flex_fns(device):
    if "flex" not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if device.type == "cuda":
            raise_recompile_limits()
            flex = torch.compile(flex_attention, dynamic=False)
        else:
            flex = flex_attention  # eager on CPU (smoke test only)
        _FLEX["flex"] = flex
        _FLEX["cbm"] = create_block_mask
    return _FLEX["flex"], _FLEX["cbm"]


def make_flex_standard(q, k, v, L, scale, device):
    """flex on (B, Hq, 1, D) x (B, Hkv, C, D) with a per-(b, kv head) length block mask."""
    flex, cbm = _flex_fns(device)
    B, Hq, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < L[b, h // G]

    bm = cbm(mask_mod, B, Hq, 1, C, device=device)
    q4 = q.unsqueeze(2)

    def fn():
        return flex(q4, k, v, block_mask=bm, scale=scale, enable_gqa=True)

    return fn, lambda o: o.squeeze(2)


def make_flex_grouped(q, k, v, L, scale, device):
    """flex with the G query heads of a kv head as G query positions: (B*Hkv, 1, G, D)."""
    flex, cbm = _flex_fns(device)
    B, Hq, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    Lf = L.reshape(B * Hkv)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < Lf[b]

    bm = cbm(mask_mod, B * Hkv, 1, G, C, device=device)
    qg = q.view(B * Hkv, 1, G, D)
    kg = k.view(B * Hkv, 1, C, D)
    vg = v.view(B * Hkv, 1, C, D)

    def fn():
        return flex(qg, kg, vg, block_mask=bm, scale=scale)

    return fn, lambda o: o.reshape(B, Hq, D)


def make_ours(q, k, v, L, scale, device):
    from dms_flex.kernels import decode as dk

    if device.type != "cuda":  # --cpu-smoke: the public API falls back to the reference
        return (lambda: dk.decode_attention(q, k, v, L, scale)), (lambda o: o)
    return (lambda: dk.decode_attention(q, k, v, L, scale)), (lambda o: o)


def make_sdpa(q, k, v, scale):
    q4 = q.unsqueeze(2)

    def fn():
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    return fn, lambda o: o.squeeze(2)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
def _l2_bytes(device):
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return int(getattr(p, "L2_cache_size", 50 << 20) or (50 << 20))
    return 1 << 20


def _rotations(set_bytes, device, cap=8):
    return int(max(1, min(cap, math.ceil(3 * _l2_bytes(device) / max(set_bytes, 1)))))


def make_sets(B, Hkv, G, D, cap, live, dtype, device, ragged, n_sets, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, Hkv * G, D, device=device, generator=gen, dtype=torch.float32).to(dtype)
        k = torch.randn(B, Hkv, cap, D, device=device, generator=gen, dtype=torch.float32).to(dtype)
        v = torch.randn(B, Hkv, cap, D, device=device, generator=gen, dtype=torch.float32).to(dtype)
        if ragged:
            lo, hi = max(1, int(0.9 * live)), min(cap, int(math.ceil(1.1 * live)))
            L = torch.randint(lo, hi + 1, (B, Hkv), device=device, generator=gen, dtype=torch.int64).to(torch.int32)
        else:
            L = torch.full((B, Hkv), live, device=device, dtype=torch.int32)
        sets.append((q, k, v, L))
    return sets


def run_method(name, builder, sets, device, ref, reps, check=True):
    """builder(q, k, v, L) -> (fn, post). Checks set 0 against ref, then times all sets."""
    try:
        fns, posts = [], []
        for q, k, v, L in sets:
            fn, post = builder(q, k, v, L)
            fns.append(fn)
            posts.append(post)
        err = None
        if check and ref is not None:
            err = rel_err(posts[0](fns[0]()), ref)
        t, mode = time_fns(fns, device, reps=reps)
        return dict(time_us=t * 1e6, mode=mode, rel_err=err)
    except Exception as e:
        import traceback

        log(f"  {name} failed: {e!r}")
        return dict(error=repr(e), tb=traceback.format_exc()[-2000:])


def _bench_info(args, device):
    info = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dtype=args.dtype,
        ragged=args.ragged,
    )
    add_triton_version(info)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["sm_count"] = p.multi_processor_count
        info["l2_bytes"] = _l2_bytes(device)
    return info


def _bench_plan(args):
    """(models, shapes, crs, copy_bytes) of this run."""
    if args.cpu_smoke:
        models = {"tiny-d64": dict(Hq=8, Hkv=2, D=64), "tiny-d32": dict(Hq=6, Hkv=2, D=32)}
        return models, [(2, 256), (1, 512)], [1, 4], 64 << 20
    models = MODELS if not args.models else {m: MODELS[m] for m in args.models.split(",")}
    shapes = args.shapes or SHAPES
    crs = args.crs or ([1, 8] if args.quick else CRS)
    return models, shapes, crs, 2 << 30


def _dense_case(mname, m, B, ctx, dtype, device, args):
    """Dense SDPA on the full ctx cache (the row's baseline), or None under --no-dense."""
    if args.no_dense:
        return None
    Hkv, D, G = m["Hkv"], m["D"], m["Hq"] // m["Hkv"]
    scale = D**-0.5
    dense_bytes = 2 * B * Hkv * ctx * D * torch.empty((), dtype=dtype).element_size()
    n_sets = _rotations(dense_bytes, device)
    dsets = make_sets(B, Hkv, G, D, ctx, ctx, dtype, device, False, n_sets, seed=1)
    log(f"[{mname} B={B} ctx={ctx}] dense SDPA ({n_sets} sets)")
    dense = run_method(
        "sdpa_dense", lambda q, k, v, L: make_sdpa(q, k, v, scale), dsets, device, None, args.reps, check=False
    )
    dense["kv_bytes"] = dense_bytes
    if "time_us" in dense:
        dense["TBps"] = dense_bytes / dense["time_us"] / 1e6
    del dsets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dense


def _time_ours_extras(res, sets, scale, device, ref, args):
    """The kernel's eager launch path (do_bench) and, with --with-compiled, inside torch.compile."""
    from dms_flex.kernels import decode as dk

    if device.type == "cuda" and "time_us" in res["ours"]:
        # eager launch path (no graph), to show the host overhead
        try:
            import triton.testing

            q, k, v, L = sets[0]
            t = triton.testing.do_bench(
                lambda: dk.decode_attention(q, k, v, L, scale), warmup=25, rep=100, return_mode="median"
            )
            res["ours"]["eager_do_bench_us"] = t * 1e3
        except Exception as e:
            res["ours"]["eager_do_bench_error"] = repr(e)
    if args.with_compiled and device.type == "cuda":
        # the kernel as inductor launches it inside torch.compile(fullgraph=True)
        cfn = torch.compile(lambda q, k, v, L: dk.decode_attention(q, k, v, L, scale), fullgraph=True)
        res["ours_compiled"] = run_method(
            "ours_compiled", lambda q, k, v, L: ((lambda: cfn(q, k, v, L)), (lambda o: o)), sets, device, ref, args.reps
        )


def _time_int8(res, sets, scale, device, args, live_tokens, D):
    """int8 K/V with a float32 scale per (row, KV head, token), quantized as the cache does; the
    kernel dequantizes in registers. Its bytes: D + 4 per token and tensor."""
    from dms_flex.kernels import decode as dk
    from dms_flex.quant import quantize_kv

    qsets = []
    for q_, k_, v_, L_ in sets:
        kq, ks = quantize_kv(k_)
        vq, vs = quantize_kv(v_)
        qsets.append((q_, (kq, ks), (vq, vs), L_))
    q0, L0 = sets[0][0], sets[0][3]
    ref8 = dk.decode_attention_reference(
        q0, qsets[0][1][0], qsets[0][2][0], L0, scale, k_scale=qsets[0][1][1], v_scale=qsets[0][2][1]
    )
    res["ours_int8"] = run_method(
        "ours_int8",
        lambda q, k, v, L: (
            (lambda: dk.decode_attention(q, k[0], v[0], L, scale, k_scale=k[1], v_scale=v[1])),
            (lambda o: o),
        ),
        qsets,
        device,
        ref8,
        args.reps,
    )
    res["ours_int8"]["live_kv_bytes"] = 2 * live_tokens * (D + 4)


def _time_methods(sets, scale, device, ref, args, live_tokens, D):
    """Every method on one case's input sets: {method: result}."""
    res = {}
    res["ours"] = run_method(
        "ours", lambda q, k, v, L: make_ours(q, k, v, L, scale, device), sets, device, ref, args.reps
    )
    _time_ours_extras(res, sets, scale, device, ref, args)
    if args.int8:
        _time_int8(res, sets, scale, device, args, live_tokens, D)
    flex_variants = [] if args.no_flex else args.flex.split(",")
    if "standard" in flex_variants:
        res["flex"] = run_method(
            "flex", lambda q, k, v, L: make_flex_standard(q, k, v, L, scale, device), sets, device, ref, args.reps
        )
    if "grouped" in flex_variants:
        res["flex_grouped"] = run_method(
            "flex_grouped",
            lambda q, k, v, L: make_flex_grouped(q, k, v, L, scale, device),
            sets,
            device,
            ref,
            args.reps,
        )
    if not args.no_sdpa_compact:
        res["sdpa_compact_nomask"] = run_method(
            "sdpa_compact",
            lambda q, k, v, L: make_sdpa(q, k, v, scale),
            sets,
            device,
            ref if not args.ragged else None,
            args.reps,
            check=not args.ragged,
        )
    return res


def _speedups(row, res, dense):
    """The row's ratios of the other methods' times to ours."""
    o = res["ours"].get("time_us")
    if not o:
        return
    flex_ts = [res[k]["time_us"] for k in ("flex", "flex_grouped") if k in res and "time_us" in res[k]]
    if flex_ts:
        row["speedup_vs_best_flex"] = min(flex_ts) / o
    if "flex" in res and "time_us" in res["flex"]:
        row["speedup_vs_flex"] = res["flex"]["time_us"] / o
    if dense is not None and "time_us" in dense:
        row["speedup_vs_dense_sdpa"] = dense["time_us"] / o
    if "time_us" in res.get("ours_int8", {}):
        row["int8_time_ratio"] = res["ours_int8"]["time_us"] / o
    if "time_us" in res.get("sdpa_compact_nomask", {}):
        row["speedup_vs_sdpa_compact"] = res["sdpa_compact_nomask"]["time_us"] / o


def _cr_case(mname, m, B, ctx, cr, dtype, device, args, bw, dense):
    """One (model, B, ctx, CR) row: the compact cache at live length ctx/CR, every method timed."""
    from dms_flex.kernels import decode as dk

    Hq, Hkv, D = m["Hq"], m["Hkv"], m["D"]
    G, scale = Hq // Hkv, D**-0.5
    esz = torch.empty((), dtype=dtype).element_size()
    live = ctx // cr
    cap = int(math.ceil(1.1 * live)) if args.ragged else live
    n_sets = _rotations(2 * B * Hkv * cap * D * esz, device)
    sets = make_sets(B, Hkv, G, D, cap, live, dtype, device, args.ragged, n_sets, seed=2 + cr)
    live_tokens = int(sets[0][3].sum().item())
    live_bytes = 2 * live_tokens * D * esz
    ref = dk.decode_attention_reference(*sets[0], scale)
    row = dict(
        model=mname,
        Hq=Hq,
        Hkv=Hkv,
        D=D,
        B=B,
        ctx=ctx,
        CR=cr,
        capacity=cap,
        live_tokens_set0=live_tokens,
        live_kv_bytes=live_bytes,
        n_sets=n_sets,
    )
    log(f"[{mname} B={B} ctx={ctx} CR={cr}] cap={cap} live={live_bytes / 1e6:.1f} MB, {n_sets} sets")
    res = _time_methods(sets, scale, device, ref, args, live_tokens, D)
    for r in res.values():
        if "time_us" in r:
            r["live_TBps"] = r.get("live_kv_bytes", live_bytes) / r["time_us"] / 1e6
            r["frac_copy_bw"] = r["live_TBps"] * 1e12 / bw
    if dense is not None:
        res["sdpa_dense"] = dense
    _speedups(row, res, dense)
    row["large"] = live_bytes >= (128 << 20)
    row["results"] = res
    del sets, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _summary(rows):
    summary = {}
    large = [r for r in rows if r["large"] and "frac_copy_bw" in r["results"]["ours"]]
    if large:
        summary["min_frac_copy_bw_large"] = min(r["results"]["ours"]["frac_copy_bw"] for r in large)
        summary["target_frac_copy_bw"] = 0.85
    sp = [r["speedup_vs_best_flex"] for r in rows if "speedup_vs_best_flex" in r]
    if sp:
        summary["min_speedup_vs_best_flex"] = min(sp)
        summary["target_speedup_vs_flex"] = 4.0
    sp = [r["speedup_vs_flex"] for r in rows if "speedup_vs_flex" in r]
    if sp:
        summary["min_speedup_vs_flex_standard"] = min(sp)
    errs = [r["results"]["ours"].get("rel_err") for r in rows if r["results"]["ours"].get("rel_err") is not None]
    if errs:
        summary["max_rel_err_ours"] = max(errs)
    return summary


def bench_main(args):
    device = kernel_bench_device(args.cpu_smoke)
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    info = _bench_info(args, device)
    models, shapes, crs, copy_bytes = _bench_plan(args)
    if device.type == "cuda":
        raise_recompile_limits()
    bw, t_copy, mode = copy_bandwidth(device, copy_bytes)
    info["copy_bw_TBps"] = bw / 1e12
    info["copy_time_us"] = t_copy * 1e6
    log(f"copy bandwidth: {bw / 1e12:.3f} TB/s ({mode})")

    rows = []
    for mname, m in models.items():
        for B, ctx in shapes:
            dense = _dense_case(mname, m, B, ctx, dtype, device, args)
            for cr in crs:
                rows.append(_cr_case(mname, m, B, ctx, cr, dtype, device, args, bw, dense))
    summary = _summary(rows)
    out = dict(info=info, rows=rows, summary=summary)
    print_table(info, rows, summary)
    emit_json(out, args.out)
    return 0


def _fmt(x, f="{:.1f}"):
    return "-" if x is None else f.format(x)


def print_table(info, rows, summary):
    print(
        f"# {info['device']}  torch {info['torch']}  triton {info.get('triton', '?')}  dtype {info['dtype']}  "
        f"ragged={info['ragged']}  copy {info['copy_bw_TBps']:.3f} TB/s"
    )
    hdr = (
        f"{'model':12s} {'B':>3s} {'ctx':>6s} {'CR':>2s} {'liveMB':>7s} | {'ours us':>8s} {'TB/s':>5s} {'xcopy':>5s} "
        f"{'err':>7s} | {'flex us':>8s} {'flexG us':>8s} {'xflex':>5s} | {'sdpaC us':>8s} {'dense us':>8s} {'xdense':>6s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        res = r["results"]
        o = res["ours"]
        print(
            f"{r['model']:12s} {r['B']:3d} {r['ctx']:6d} {r['CR']:2d} {r['live_kv_bytes'] / 1e6:7.1f} | "
            f"{_fmt(o.get('time_us')):>8s} {_fmt(o.get('live_TBps'), '{:.2f}'):>5s} {_fmt(o.get('frac_copy_bw'), '{:.2f}'):>5s} "
            f"{_fmt(o.get('rel_err'), '{:.1e}'):>7s} | "
            f"{_fmt(res.get('flex', {}).get('time_us')):>8s} {_fmt(res.get('flex_grouped', {}).get('time_us')):>8s} "
            f"{_fmt(r.get('speedup_vs_best_flex'), '{:.2f}'):>5s} | "
            f"{_fmt(res.get('sdpa_compact_nomask', {}).get('time_us')):>8s} {_fmt(res.get('sdpa_dense', {}).get('time_us')):>8s} "
            f"{_fmt(r.get('speedup_vs_dense_sdpa'), '{:.2f}'):>6s} | "
            f"{_fmt(res.get('ours_int8', {}).get('time_us')):>8s} "
            f"{_fmt(res.get('ours_int8', {}).get('frac_copy_bw'), '{:.2f}'):>5s}"
        )
    print("summary:", json.dumps(summary))


def emit_json(obj, path):
    s = json.dumps(obj, indent=1, default=str)
    if path:
        with open(path, "w") as f:
            f.write(s)
        print(f"wrote {path}")
    else:
        print(s)


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------
SWEEP_CASES = [  # (model, B, ctx, CR)
    ("llama3-8b", 8, 32768, 1),
    ("llama3-8b", 8, 32768, 8),
    ("llama3-8b", 64, 8192, 4),
    ("llama3.2-1b", 1, 131072, 8),
    ("llama3.2-1b", 8, 32768, 8),
]


def _best(results):
    good = [r for r in results if "time_us" in r]
    return min(good, key=lambda r: r["time_us"]) if good else None


def _sweep_grid(trial, D, esz, B, Hkv, cap, sm, results):
    """Block size x warps x stages at the auto split; then the split size around the best of them."""
    from dms_flex.kernels import decode as dk

    int8 = esz == 1
    for block_n in (32, 64, 128, 256) if int8 else (32, 64, 128):
        for nw in (4, 8):
            for ns in (2, 3, 4):
                if block_n * D * esz * 2 * ns > 200_000:
                    continue  # shared memory
                trial(block_n=block_n, num_warps=nw, num_stages=ns)
    best = _best([r for r in results if not r.get("default")])
    if best is not None:
        bn = best["block_n"]
        auto_split, _ = dk.choose_split(B, Hkv, cap, bn, sm, int8)
        one = dk._split_size(cap, 1, bn)  # one split per (row, KV head): no merge launch, no partials
        for split in sorted({max(bn, int(round(auto_split * m / bn)) * bn) for m in (0.25, 0.5, 2.0, 4.0)} | {one}):
            if split != auto_split:
                trial(
                    block_n=bn,
                    num_warps=best["num_warps"],
                    num_stages=best["num_stages"],
                    split_size=split,
                    num_splits=-(-cap // split),
                )


def _parse_f16_cvts(text: str) -> str:
    from dms_flex.kernels.decode import F16_CVTS

    bad = [c for c in text.split(",") if c and c not in F16_CVTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown conversion(s) {bad}: choose from {sorted(F16_CVTS)}")
    return text


def _sweep_grid_full(trial, D, esz, B, Hkv, cap, sm, results, f16_cvts=("asm_pure",)):
    """--sweep-full: every block config at 1, 2 and 4 splits per (row, KV head) and at the auto split (a
    compact cache's splits are short, so fewer, longer programs may stream better; no merge at one split);
    int8 also with fp16 dots on the codes (`f16`, with each conversion of `f16_cvts`: one more fp16 tile per
    stage where converted as loaded)."""
    from dms_flex.kernels import decode as dk

    int8 = esz == 1
    for block_n in (64, 128, 256) if int8 else (64, 128):
        _, auto_n = dk.choose_split(B, Hkv, cap, block_n, sm, int8)
        for n in sorted({1, 2, 4, auto_n}):
            split = dk._split_size(cap, n, block_n)
            for nw in (4, 8):
                for ns in (2, 3, 4):
                    for f16 in (False, *f16_cvts) if int8 else (False,):
                        smem = block_n * D * (2 * esz * ns + (2 if f16 else 0))  # the f16 tile: offline compiles
                        if smem > 200_000:
                            continue  # shared memory
                        kw = dict(block_n=block_n, num_warps=nw, num_stages=ns, split_size=split)
                        trial(**kw, num_splits=-(-cap // split), **({"f16": f16} if f16 else {}))


def _sweep_case(mname, B, ctx, cr, dtype, device, sm, bw, args):
    from dms_flex.kernels import decode as dk

    m = SWEEP_MODELS[mname]
    Hkv, D, G = m["Hkv"], m["D"], m["Hq"] // m["Hkv"]
    cap = ctx // cr
    esz = torch.empty((), dtype=dtype).element_size()
    int8 = bool(getattr(args, "int8", False))
    live_bytes = 2 * B * Hkv * cap * (D + 4 if int8 else D * esz)
    sets = make_sets(B, Hkv, G, D, cap, cap, dtype, device, False, _rotations(live_bytes, device), seed=7)
    if int8:  # int8 K/V with a float32 scale per token, as the cache stores them
        from dms_flex.quant import quantize_kv

        sets = [(q_, *quantize_kv(k_), *quantize_kv(v_), L_) for q_, k_, v_, L_ in sets]
        if getattr(
            args, "v_slot_major", False
        ):  # V's codes with the slots contiguous (a (D, C) layout, seen as (C, D))
            sets = [
                (q_, kq, ks, vq.transpose(-1, -2).contiguous().transpose(-1, -2), vs, L_)
                for q_, kq, ks, vq, vs, L_ in sets
            ]
        sets = [(q_, (kq, ks), (vq, vs), L_) for q_, kq, ks, vq, vs, L_ in sets]
        q0, (k0, ks0), (v0, vs0), L0 = sets[0]
        ref = dk.decode_attention_reference(q0, k0, v0, L0, k_scale=ks0, v_scale=vs0)
    else:
        ref = dk.decode_attention_reference(*sets[0])
    base_cfg, *default_split = dk.launch_settings(B, Hkv, cap, D, G, esz, int8, sm)
    results = []

    def trial(**kw):
        split = kw.get("split_size")
        lk = {kk: vv for kk, vv in kw.items() if kk not in ("split_size", "num_splits", "default")}

        def builder(q, k, v, L):
            if int8:
                return (lambda: dk._launch(q, k[0], v[0], L, None, split, k[1], v[1], sm_count=sm, **lk)), (lambda o: o)
            return (lambda: dk._launch(q, k, v, L, None, split, sm_count=sm, **lk)), (lambda o: o)

        r = run_method(str(kw), builder, sets, device, ref, max(10, args.reps // 2))
        r.update(kw)
        if "time_us" in r:
            r["live_TBps"] = live_bytes / r["time_us"] / 1e6
            r["frac_copy_bw"] = r["live_TBps"] * 1e12 / bw
        results.append(r)
        log(
            f"  {kw} -> {r.get('time_us', float('nan')):.1f} us {r.get('frac_copy_bw', float('nan')):.2f}x copy "
            f"err={r.get('rel_err')}"
        )

    log(f"[{mname} B={B} ctx={ctx} CR={cr}] default: cfg {base_cfg}, split {default_split}")
    # the launch as the rule makes it (no settings given), timed first
    trial(
        default=True,
        block_n=base_cfg["BLOCK_N"],
        num_warps=base_cfg["num_warps"],
        num_stages=base_cfg["num_stages"],
        split_size=default_split[0],
        num_splits=default_split[1],
    )
    if getattr(args, "sweep_full", False):
        cvts = tuple(c for c in str(getattr(args, "f16_cvts", "asm_pure") or "").split(",") if c)
        _sweep_grid_full(trial, D, 1 if int8 else esz, B, Hkv, cap, sm, results, f16_cvts=cvts)
    else:
        _sweep_grid(trial, D, 1 if int8 else esz, B, Hkv, cap, sm, results)
    case = dict(
        int8=int8,
        v_slot_major=bool(getattr(args, "v_slot_major", False)),
        model=mname,
        B=B,
        ctx=ctx,
        CR=cr,
        live_kv_bytes=live_bytes,
        default_cfg=base_cfg,
        default_split=default_split,
        trials=results,
        best=_best(results),
    )
    sets = ref = None
    torch.cuda.empty_cache()
    return case


def _print_sweep(out, bw):
    print(f"# sweep, copy {bw / 1e12:.3f} TB/s")
    for c in out["cases"]:
        b = c["best"] or {}
        d = [r for r in c["trials"] if r.get("default")]
        dt = d[0].get("time_us") if d else None
        print(
            f"{c['model']:12s} B={c['B']:3d} ctx={c['ctx']:6d} CR={c['CR']}: default {_fmt(dt)} us, best "
            f"{_fmt(b.get('time_us'))} us ({_fmt(b.get('frac_copy_bw'), '{:.2f}')}x copy) with "
            f"block_n={b.get('block_n')} warps={b.get('num_warps')} stages={b.get('num_stages')} "
            f"splits={b.get('num_splits', 'auto')}" + (f" f16={b['f16']}" if b.get("f16") else "")
        )


def sweep_main(args):
    if not torch.cuda.is_available():
        log("--sweep needs CUDA")
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    bw, _, _ = copy_bandwidth(device)
    out = dict(copy_bw_TBps=bw / 1e12, sm_count=sm, cases=[])
    cases = SWEEP_CASES
    if args.sweep_cases:
        cases = [(m, int(b), int(c), int(r)) for m, b, c, r in (x.split(":") for x in args.sweep_cases.split(","))]
    for mname, B, ctx, cr in cases:
        out["cases"].append(_sweep_case(mname, B, ctx, cr, dtype, device, sm, bw, args))
    _print_sweep(out, bw)
    emit_json(out, args.out)
    return 0


def parse_shapes(text: str):
    """'8x32768,64x8192' -> [(8, 32768), (64, 8192)] (argparse type: a bad value is a usage error)."""
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxCTX items such as 8x32768,64x8192")
    return shapes


def parse_crs(text: str):
    """'2,4' -> [2, 4]: integer compression ratios >= 1."""
    try:
        crs = [int(c) for c in text.split(",")]
    except ValueError:
        crs = []
    if not crs or min(crs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integer CRs >= 1 such as 1,2,4,8")
    return crs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON output path (default: stdout)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="CR 1 and 8 only")
    ap.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    ap.add_argument("--ragged", action="store_true", help="lengths within +-10%% of ctx/CR")
    ap.add_argument("--flex", default="standard,grouped", help="flex variants: standard,grouped")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-sdpa-compact", action="store_true")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--with-compiled", action="store_true", help="also time torch.compile(decode_attention)")
    ap.add_argument("--int8", action="store_true", help="also time the kernel on an int8 cache (ours_int8)")
    ap.add_argument(
        "--shapes", type=parse_shapes, default=None, help="comma list of BxCTX (default 8x32768,64x8192,1x131072)"
    )
    ap.add_argument("--crs", type=parse_crs, default=None, help="comma list of CRs (default 1,2,4,8; --quick 1,8)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--sweep-full",
        action="store_true",
        help="with --sweep: every block config at 1, 2, 4 and the auto number of splits (instead of splits around the best)",
    )
    ap.add_argument(
        "--sweep-cases",
        default="",
        help="comma list of MODEL:B:CTX:CR for --sweep (default: the built-in list); with --int8 the sweep runs on int8 K/V",
    )
    ap.add_argument(
        "--f16-cvts",
        type=_parse_f16_cvts,
        default="asm_pure",
        help="with --sweep-full --int8: comma list of the fp16-dot conversions to time beside the default "
        "(names of dms_flex.kernels.decode.F16_CVTS)",
    )
    ap.add_argument(
        "--v-slot-major",
        action="store_true",
        help="with --sweep --int8: V's codes stored with the slots contiguous (a layout experiment)",
    )
    ap.add_argument("--aot", action="store_true", help="offline sm_90 compile report (no GPU needed)")
    ap.add_argument("--aot-quick", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.aot:
        return aot_main(args.aot_quick)
    if args.sweep:
        return sweep_main(args)
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
