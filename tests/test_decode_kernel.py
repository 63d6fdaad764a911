"""Tests for dms_flex.kernels.decode (decode attention over the compact KV cache).

CPU machines:
  * the reference against an independent float64 loop over (b, h, g);
  * the Triton kernels through Triton's CPU interpreter. TRITON_INTERPRET=1 must be in the
    environment before triton is first imported (it decorates tl.* helpers at import), and it
    must never leak into the rest of the pytest process (inductor's own Triton kernels would be
    interpreted too). So the interpreter cases run in ONE subprocess (this file executed as a
    script with --interp-worker) and each pytest case checks its row of the JSON it prints;
  * an offline sm_90 compile of the real (non-interpreted) kernels and a fake-CUDA trace of the
    triton_op decomposition, through `benchmarks/bench_decode_kernel.py --aot` (subprocess).
GPU machines (`-m gpu`): realistic shapes against the reference, torch.compile(fullgraph=True)
and CUDA-graph capture.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests import _interp  # noqa: E402
from dms_flex.kernels.decode import (  # noqa: E402
    choose_split,
    decode_attention,
    decode_attention_reference,
)

HAS_TRITON_PKG = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON_PKG, reason="triton is not installed")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def naive_f64(q, k_cache, v_cache, lengths, scale=None, k_scale=None, v_scale=None):
    """Independent float64 loop over (b, h, g) on the live slice only."""
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            n = int(min(max(int(lengths[b, h]), 0), C))
            if n == 0:
                continue
            k = k_cache[b, h, :n].double()
            v = v_cache[b, h, :n].double()
            if k_scale is not None:
                k = k * k_scale[b, h, :n].double()[:, None]
                v = v * v_scale[b, h, :n].double()[:, None]
            for g in range(G):
                qv = q[b, h * G + g].double()
                s = (k @ qv) * scale
                p = torch.exp(s - s.max())
                out[b, h * G + g] = (p[:, None] * v).sum(0) / p.sum()
    return out


def rel_err(a, b):
    a = a.double().cpu()
    b = b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_lengths(kind, B, Hkv, C, gen):
    if kind == "zero":
        L = torch.zeros(B, Hkv, dtype=torch.int64)
    elif kind == "one":
        L = torch.ones(B, Hkv, dtype=torch.int64)
    elif kind == "full":
        L = torch.full((B, Hkv), C, dtype=torch.int64)
    elif kind == "ragged":
        L = torch.randint(0, C + 1, (B, Hkv), generator=gen)
        flat = L.view(-1)
        # make sure the edge cases appear in every ragged draw
        flat[0] = 0
        if flat.numel() > 1:
            flat[1] = C
        if flat.numel() > 2:
            flat[2] = 1
    else:
        raise ValueError(kind)
    return L


def make_inputs(B, Hkv, G, D, C, dtype, lengths_kind, seed, quant=False, poison=True, cap_extra=0):
    """Random inputs; dead slots poisoned with NaN/inf. cap_extra > 0 makes the cache a slice of a
    larger buffer (non-trivial strides)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    Ct = C + cap_extra
    if quant:
        k_full = torch.randint(-127, 128, (B, Hkv, Ct, D), generator=gen, dtype=torch.int8)
        v_full = torch.randint(-127, 128, (B, Hkv, Ct, D), generator=gen, dtype=torch.int8)
        ks_full = torch.rand(B, Hkv, Ct, generator=gen) * 0.05 + 0.005
        vs_full = torch.rand(B, Hkv, Ct, generator=gen) * 0.05 + 0.005
    else:
        k_full = torch.randn(B, Hkv, Ct, D, generator=gen).to(dtype)
        v_full = torch.randn(B, Hkv, Ct, D, generator=gen).to(dtype)
        ks_full = vs_full = None
    k, v = k_full[:, :, :C], v_full[:, :, :C]
    ks = ks_full[:, :, :C] if quant else None
    vs = vs_full[:, :, :C] if quant else None
    L = make_lengths(lengths_kind, B, Hkv, C, gen)
    if poison:
        for b in range(B):
            for h in range(Hkv):
                n = int(L[b, h])
                if quant:
                    k[b, h, n:] = 127
                    v[b, h, n:] = -128
                    ks[b, h, n:] = float("nan")
                    vs[b, h, n:] = float("inf")
                else:
                    k[b, h, n:] = float("nan")
                    v[b, h, n:] = float("inf")
    return q, k, v, L, ks, vs


# ----------------------------------------------------------------------------------------------
# reference vs float64 loop (CPU, fast)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("lengths_kind", ["zero", "one", "full", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64_loop(G, lengths_kind, dtype):
    q, k, v, L, _, _ = make_inputs(2, 3, G, 16, 13, dtype, lengths_kind, seed=G * 7 + len(lengths_kind))
    ref = decode_attention_reference(q, k, v, L)
    want = naive_f64(q, k, v, L)
    assert ref.dtype == dtype and ref.shape == q.shape
    assert torch.isfinite(ref).all()
    if lengths_kind == "zero":
        assert (ref == 0).all()
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(ref, want) < tol
    # rows with length 0 are zeros in every case
    G_ = q.shape[1] // L.shape[1]
    for b in range(L.shape[0]):
        for h in range(L.shape[1]):
            if int(L[b, h]) == 0:
                assert (ref[b, h * G_ : (h + 1) * G_] == 0).all()


def test_reference_scale_int32_lengths_and_clamp():
    q, k, v, L, _, _ = make_inputs(2, 2, 4, 32, 9, torch.float32, "ragged", seed=3)
    ref = decode_attention_reference(q, k, v, L.to(torch.int32), scale=0.3)
    assert rel_err(ref, naive_f64(q, k, v, L, scale=0.3)) < 1e-5
    # lengths are clamped to [0, C]
    L2 = L.clone()
    L2[0, 0] = 1000
    L2[1, 1] = -5
    ref2 = decode_attention_reference(q, k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0), L2)
    Lc = L2.clamp(0, 9)
    assert rel_err(ref2, naive_f64(q, k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0), Lc)) < 1e-5


@pytest.mark.parametrize("G", [1, 4])
def test_reference_int8_matches_float64_loop(G):
    q, k, v, L, ks, vs = make_inputs(2, 2, G, 16, 11, torch.float32, "ragged", seed=11, quant=True)
    ref = decode_attention_reference(q, k, v, L, k_scale=ks, v_scale=vs)
    assert torch.isfinite(ref).all()
    assert rel_err(ref, naive_f64(q, k, v, L, k_scale=ks, v_scale=vs)) < 1e-5


def test_cpu_tensors_fall_back_to_reference():
    q, k, v, L, _, _ = make_inputs(2, 2, 4, 16, 20, torch.bfloat16, "ragged", seed=5)
    out = decode_attention(q, k, v, L, split_size=8)
    assert torch.equal(out, decode_attention_reference(q, k, v, L))


def test_cpu_fullgraph_trace_has_no_graph_breaks():
    q, k, v, L, _, _ = make_inputs(2, 2, 4, 16, 20, torch.float32, "ragged", seed=6)
    f = torch.compile(lambda q, k, v, L: decode_attention(q, k, v, L, split_size=8), fullgraph=True, backend="eager")
    assert torch.allclose(f(q, k, v, L), decode_attention_reference(q, k, v, L))


def test_shape_errors():
    q, k, v, L, _, _ = make_inputs(1, 2, 2, 16, 8, torch.float32, "full", seed=0)
    with pytest.raises(ValueError):
        decode_attention(q[:, :3], k, v, L)  # Hq not a multiple of Hkv
    with pytest.raises(ValueError):
        decode_attention(q, k, v, L[:, :1])
    with pytest.raises(ValueError):
        decode_attention(q, k, v, L.float())
    with pytest.raises(ValueError):
        decode_attention(q, k.to(torch.int8), v.to(torch.int8), L)  # int8 without scales


def test_choose_split_shapes_only():
    for B, Hkv, C in [
        (8, 8, 32768),
        (64, 8, 8192),
        (1, 8, 131072),
        (8, 8, 4096),
        (64, 8, 1024),
        (1, 1, 1),
        (3, 5, 1000),
        (1, 8, 16384),
        (16, 8, 4220),
        (16, 3, 7128),
    ]:
        for quant, stream in ((False, 4096), (True, 2048)):
            for block_n in (32, 64, 128):
                split, n = choose_split(B, Hkv, C, block_n, 132, quant)
                assert split % block_n == 0 and split >= block_n
                assert n == -(-C // split)  # splits cover the capacity exactly
                assert (n - 1) * split < C
                if C // stream <= 2 and B * Hkv * max(1, C // stream) >= 0.9 * 132:
                    # one or two long streams per (row, KV head) fill the GPU: every program streams >= `stream`
                    # slots (rounding up to whole blocks may leave a short last one)
                    assert n <= max(1, C // stream) and split >= min(C, stream)
                elif split >= 256 and n > 1:
                    # either the grid is ~filled (rounding splits up to whole blocks may lose a few
                    # programs) or splits hit the minimum size
                    assert B * Hkv * n >= 0.75 * 8 * 132 or split <= 256 + block_n
    # the measured cases: Llama-3-8B heads at B=16 over a 4,096-slot compact cache run one program per
    # (row, KV head) (bf16) or two (int8); B=1 and SmolLM2's 3 KV heads still split for parallelism
    assert choose_split(16, 8, 4220, 128, 132) == (4224, 1)
    assert choose_split(16, 8, 4220, 128, 132, quant=True)[1] == 2
    assert choose_split(1, 8, 4096, 64, 132)[1] == 16
    assert choose_split(16, 3, 1750, 128, 132)[1] == 7
    # a long dense cache keeps several programs per SM (9 splits measured 1.8% faster than 8 long streams)
    assert choose_split(16, 8, 32892, 64, 132)[1] == 9
    # the heuristic is a pure function of Python ints
    assert choose_split(8, 8, 4096, 64, 132) == choose_split(8, 8, 4096, 64, 132)


@needs_triton
def test_f16_option_names_its_conversion():
    """f16: False/None (no fp16 dots), True (the default conversion) or a name of F16_CVTS; the PTX ones
    convert plainly in the interpreter; an unknown name is an error that lists the choices."""
    from dms_flex.kernels import decode as dk

    assert dk._f16_cvt(None, False) == dk._f16_cvt(False, False) == 0
    assert dk._f16_cvt(True, False) == dk.F16_CVTS[dk.F16_DEFAULT_CVT]
    assert dk._f16_cvt("asm", False) == 1 and dk._f16_cvt("asm", True) == 0
    assert dk._f16_cvt("asm_pure", True) == 0 and dk._f16_cvt("arith_fold", True) == 4
    with pytest.raises(ValueError, match="one of .*arith"):
        dk._f16_cvt("fast", False)


def test_launch_settings_long_streams_and_explicit_settings():
    """The block settings a launch takes (Llama-3-8B heads: D=128, G=4, bf16 2-byte elements, 132 SMs)."""
    from dms_flex.kernels.decode import launch_settings

    def run(B, C, quant=False, **kw):
        cfg, split, n = launch_settings(B, 8, C, 128, 4, 2, quant, 132, **kw)
        return cfg["BLOCK_N"], cfg["num_stages"], split, n

    # one program per (row, KV head), ~one per SM: 128-slot tiles, 3 stages, no merge (section 28a)
    assert run(16, 4224) == (128, 3, 4224, 1)
    # int8: two programs per (row, KV head), 3 stages, its 128-slot tile
    assert run(16, 4224, quant=True) == (128, 3, 2176, 2)
    # one split but ~4 programs per SM: the rule's smaller tile, which lets them share an SM
    assert run(64, 2048)[:2] == (64, 3) and run(64, 2048)[3] == 1
    # a long dense cache and a small batch keep the 8-programs-per-SM rule and its tile
    assert run(16, 32892) == (64, 3, 3712, 9)
    assert run(1, 4224)[:2] == (64, 3) and run(1, 4224)[3] == 17
    # explicit settings win and replace only what they name; the long streams' settings are not mixed in
    assert run(16, 4224, block_n=64) == (64, 3, 4224, 1)
    assert run(16, 4224, num_stages=2) == (64, 2, 4224, 1)
    assert run(16, 4224, quant=True, num_stages=4) == (128, 4, 2176, 2)
    # a given number of splits or split size replaces the rule (and its long-stream settings)
    assert run(16, 4224, num_splits=9) == (64, 3, 512, 9)
    assert run(16, 4224, split_size=1000) == (64, 3, 1000, 5)


@needs_triton
def test_inductor_reemits_the_kernel_with_its_helper(tmp_path):
    """torch.compile re-emits a user Triton kernel and its jit helpers from their source: the helper the
    kernel calls must be defined there under the name it is called by (a helper defined as `f_fn` and
    bound to `f` fails with a NameError in compiled steps only)."""
    import importlib.util
    import re

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    from dms_flex.kernels import decode as dk

    src = user_defined_triton_kernel_transitive_closure_source_code(dk._decode_split_kernel)
    called = set(re.findall(r"\b(_\w+)\(", src.split("def _decode_split_kernel_fn", 1)[1]))
    defined = set(re.findall(r"^def (\w+)\(", src, re.M))
    assert "_i8_to_f16" in called and "_i8_to_f16" in defined
    helpers = {name for name in called if callable(getattr(dk, name, None))}
    assert helpers <= defined, helpers - defined
    path = tmp_path / "reemitted.py"
    path.write_text("import triton\nimport triton.language as tl\n" + src)
    spec = importlib.util.spec_from_file_location("reemitted", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # every name resolves and the jit decorators accept the source
    assert hasattr(mod, "_i8_to_f16")


def test_int8_to_fp16_ptx_arithmetic():
    """The PTX of `_i8_to_f16` (xor, two byte permutes, an fp16x2 subtraction; the same in its impure and pure
    forms), emulated with its own constants
    on every int8 code and every position in the packed word: each code comes back exactly, in order."""
    import inspect
    import re

    import numpy as np

    from dms_flex.kernels import decode as dk

    src = inspect.getsource(dk._i8_to_f16_fn)
    xor = int(re.search(r"xor\.b32 t, \$2, (0x[0-9a-f]+)", src).group(1), 16)
    prmts = list(dict.fromkeys(re.findall(r"prmt\.b32 \$(\d), t, (0x[0-9a-f]+), (0x[0-9a-f]+)", src)))  # impure, pure
    sub = int(re.search(r"mov\.b32 m, (0x[0-9a-f]+)", src).group(1), 16)
    assert len(prmts) == 2 and "sub.f16x2 $0, $0, m" in src and "sub.f16x2 $1, $1, m" in src

    for _, _, sel in prmts:  # no sign-replicate bit (bit 3 of a selector nibble): plain byte moves
        assert all((int(sel, 16) >> (4 * i + 3)) & 1 == 0 for i in range(4)), sel

    def prmt(a, b, sel):  # PTX prmt.b32 (default mode): result byte i = byte sel_i of {b, a}
        pool = a.to_bytes(4, "little") + b.to_bytes(4, "little")
        return int.from_bytes(bytes(pool[(sel >> (4 * i)) & 7] for i in range(4)), "little")

    def half(bits):
        return np.array([bits], dtype=np.uint16).view(np.float16)[0]

    codes = np.arange(-128, 128, dtype=np.int64)
    for pos in range(4):
        for c in codes:
            word = [(int(c) + 37 * j) % 256 for j in range(4)]  # other bytes vary too
            word[pos] = int(c) & 0xFF
            x = int.from_bytes(bytes(word), "little")
            t = x ^ xor
            out = {int(r): prmt(t, int(bval, 16), int(sel, 16)) for r, bval, sel in prmts}
            vals = []
            for r in (0, 1):  # $0 holds elements 0, 1; $1 elements 2, 3 (low half first)
                for h in (0, 1):
                    a = half((out[r] >> (16 * h)) & 0xFFFF)
                    m = half((sub >> (16 * h)) & 0xFFFF)
                    vals.append(np.float16(a - m))
            want = [b - 256 if b > 127 else b for b in word]
            assert [float(v) for v in vals] == [float(w) for w in want], (pos, c, vals, want)


# ----------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter (one subprocess for all cases)
# ----------------------------------------------------------------------------------------------
def _interp_cases():
    """(id, params). Small shapes: the interpreter is slow."""
    cases = []

    def add(**p):
        p.setdefault("B", 2)
        p.setdefault("Hkv", 2)
        p.setdefault("D", 32)
        p.setdefault("C", 40)
        p.setdefault("lengths", "ragged")
        p.setdefault("split_size", None)
        p.setdefault("quant", False)
        p.setdefault("cap_extra", 0)
        p.setdefault("scale", None)
        p.setdefault("noncontig_q", False)
        p.setdefault("len_dtype", "int64")
        p.setdefault("f16", False)  # int8: fp16 dots on the codes (the benchmarks' option)
        p.setdefault("small", "")  # "v": V's scales times 1e-4; "q": q times 1e-6 and K's scales times 1e6
        p.setdefault("sm_count", None)  # a small count makes these shapes "fill the GPU": the long-stream rule
        p.setdefault("override", "")  # "SPLITS/BLOCK_N": the benchmarks' launch override (decode._LAUNCH_OVERRIDE)
        cid = "-".join(f"{k}={v}" for k, v in sorted(p.items()))
        cases.append((cid, p))

    # GQA group sizes x dtypes, single-split path (auto split on a small capacity) and multi-split
    for G in (1, 3, 4, 8):
        for dtype in ("float32", "float16", "bfloat16"):
            add(G=G, dtype=dtype)
            add(G=G, dtype=dtype, split_size=16, C=50)
    # edge-case lengths in both paths
    for lk in ("zero", "one", "full"):
        for ss in (None, 16):
            add(G=4, dtype="float16", lengths=lk, split_size=ss)
    # head dims of the real models, and a non power of two
    add(G=4, dtype="bfloat16", D=128, C=70, split_size=32, len_dtype="int32")
    add(G=4, dtype="float16", D=64, C=70, split_size=64)
    add(G=2, dtype="float32", D=96, C=33, split_size=16)
    add(G=2, dtype="float32", D=8, C=20, split_size=None)  # head dim below tl.dot's minimum K of 16
    # many splits: the merge kernel loops over BLOCK_S=64 chunks
    add(G=2, dtype="float32", B=1, Hkv=2, C=150, split_size=2, lengths="full")
    add(G=2, dtype="float16", B=1, Hkv=2, C=150, split_size=2)
    # split sizes that are not multiples of BLOCK_N, strided cache, strided q, custom scale
    add(G=4, dtype="float16", C=61, split_size=24, cap_extra=9, noncontig_q=True, scale=0.2, len_dtype="int32")
    add(G=3, dtype="bfloat16", C=45, split_size=None, cap_extra=5, noncontig_q=True)
    # int8 cache with per-token scales (dequantized in the kernel)
    for dtype in ("float32", "float16", "bfloat16"):
        add(G=4, dtype=dtype, quant=True, C=50, split_size=16)
    add(G=1, dtype="float16", quant=True, C=50, split_size=None)
    # the long-stream rule (one program per row and KV head, or two for int8 from 4,096 slots) with its block
    # settings; a small SM count makes these shapes fill the GPU
    add(G=4, dtype="bfloat16", C=50, sm_count=4)
    add(G=4, dtype="float16", C=50, sm_count=4, lengths="full")
    add(G=2, dtype="float32", C=50, quant=True, sm_count=4)
    add(G=1, B=1, Hkv=1, D=16, dtype="float16", C=4100, quant=True, sm_count=1, lengths="full")  # two splits
    # int8 with fp16 dots (q / max|q| and p * scale / max scale rounded to fp16), both split paths
    for dtype in ("float32", "float16", "bfloat16"):
        add(G=4, dtype=dtype, quant=True, C=50, split_size=16, f16=True)
    add(G=2, dtype="bfloat16", quant=True, C=50, f16=True, sm_count=4, lengths="full")
    add(G=4, dtype="float16", quant=True, C=50, split_size=16, f16=True, small="v")  # V scales ~1e-6
    add(G=4, dtype="float32", quant=True, C=50, split_size=16, f16=True, small="q")  # q ~1e-6
    # the conversions the interpreter runs as written: integer ops on the bits, and the offset folded into the sums
    add(G=4, dtype="bfloat16", quant=True, C=50, split_size=16, f16="arith")
    add(G=3, D=48, dtype="float16", quant=True, C=50, f16="arith_fold", sm_count=4, small="v")
    # the benchmarks' launch override: a number of splits (one: no merge) and a block size
    add(G=4, dtype="float16", C=50, override="1/16")
    add(G=4, dtype="bfloat16", C=50, override="4/16", lengths="full")
    add(G=2, dtype="float32", C=50, quant=True, override="2/32")
    return cases


def _run_interp_case(p):
    from dms_flex.kernels import decode as dk

    dtype = getattr(torch, p["dtype"])
    q, k, v, L, ks, vs = make_inputs(
        p["B"],
        p["Hkv"],
        p["G"],
        p["D"],
        p["C"],
        dtype,
        p["lengths"],
        seed=zlib.crc32(json.dumps(p, sort_keys=True).encode()),
        quant=p["quant"],
        cap_extra=p["cap_extra"],
    )
    if p["small"] == "v":
        vs = vs * 1e-4
    elif p["small"] == "q":  # scores of order one from a q in fp16's subnormal range
        q, ks = q * 1e-6, ks * 1e6
    if p["noncontig_q"]:
        # same values, (B, Hq, D) view of a (Hq, B, D) buffer
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        assert not q.is_contiguous()
    L = L.to(getattr(torch, p["len_dtype"]))
    if p["len_dtype"] == "int32":
        L = L.t().contiguous().t()  # non-contiguous lengths too
    if p["override"]:
        splits, block_n = (int(x) for x in p["override"].split("/"))
        dk._LAUNCH_OVERRIDE.update(num_splits=splits, block_n=block_n)
    rule = dk.choose_split

    def no_rule(*a, **k):  # the override's number of splits replaces the shape rule
        raise AssertionError("choose_split called under a num_splits override")

    dk.choose_split = no_rule if p["override"] else rule
    try:
        out = dk._launch(
            q, k, v, L, p["scale"], p["split_size"], ks, vs, poison=True, sm_count=p["sm_count"], f16=p["f16"]
        )
    finally:
        dk._LAUNCH_OVERRIDE.clear()
        dk.choose_split = rule
    ref = decode_attention_reference(q, k, v, L, p["scale"], k_scale=ks, v_scale=vs)
    want = naive_f64(q, k, v, L, p["scale"], ks, vs)
    zero_rows_ok = True
    G = p["G"]
    for b in range(L.shape[0]):
        for h in range(L.shape[1]):
            if int(L[b, h]) == 0:
                zero_rows_ok &= bool((out[b, h * G : (h + 1) * G] == 0).all())
    return dict(
        err_ref=rel_err(out.float(), ref.float()) if ref.float().norm() > 0 else float(out.float().abs().max()),
        err_f64=rel_err(out.float(), want) if want.norm() > 0 else float(out.float().abs().max()),
        finite=bool(torch.isfinite(out).all()),
        dtype_ok=out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape),
        zero_rows_ok=zero_rows_ok,
    )


def _interp_worker():
    _interp.run_worker(_interp_cases(), _run_interp_case)


@functools.lru_cache(maxsize=None)
def _interp_results():
    return _interp.results(__file__, threads="2")


@needs_triton
@pytest.mark.parametrize("cid,params", _interp_cases(), ids=[c for c, _ in _interp_cases()])
def test_triton_kernel_interpreter(cid, params):
    r = _interp_results()[cid]
    assert "error" not in r, r.get("error")
    assert r["finite"], "NaN/inf in the output: unwritten element, stale partial or poisoned slot read"
    assert r["dtype_ok"]
    assert r["zero_rows_ok"]
    if params["f16"]:
        tol = 1e-2 if params["dtype"] == "bfloat16" else 2e-3  # q and p rounded to fp16; a bf16 output
    elif params["dtype"] == "float32":
        tol = 1e-5 if not params["quant"] else 1e-4
    elif params["dtype"] == "float16":
        tol = 2e-3
    else:
        tol = 1e-2
    assert r["err_ref"] < tol, r
    assert r["err_f64"] < tol, r


# ----------------------------------------------------------------------------------------------
# offline sm_90 compile of the real kernels + fake-CUDA trace of the triton_op (subprocess)
# ----------------------------------------------------------------------------------------------
@needs_triton
def test_aot_compile_sm90_and_triton_op_trace():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_decode_kernel.py"), "--aot", "--aot-quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rep = json.loads(proc.stdout.split("@@AOT@@", 1)[1])
    if rep.get("skipped"):
        pytest.skip(rep["skipped"])
    for row in rep["kernels"]:
        assert row["local_bytes"] == 0, row  # no register spills
        if row["kernel"] == "split":
            if row["dtype"] != "float32":  # fp32 runs an exact (ieee) FMA dot
                assert row["mma"] > 0, row  # tensor-core dot
            assert row["cp_async"] > 0 or row["vec_loads"] > 0, row  # pipelined / 16-byte loads
            assert row["scalar_b16_loads"] == 0, row
            if row["launch"].get("f16") == "asm":
                # fp16 dots on int8 codes, the impure PTX: the codes are converted where they are loaded (16-byte
                # shared loads), not gathered a byte at a time into the dot's layout as the bf16 conversion is
                assert row["byte_shared_loads"] == 0, row
            if row["launch"].get("f16") == "asm_pure":
                # the same PTX, pure: Triton moves it past the tile's move, whose byte-wise gather then shows
                assert row["byte_shared_loads"] > 0, row
    assert {r["launch"].get("f16") for r in rep["kernels"]} >= {"asm", "asm_pure"}
    assert rep["trace"]["ok"], rep["trace"]
    assert rep["trace"]["triton_calls"] >= 1


# ----------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------
def _cuda_inputs(B, Hkv, G, D, C, dtype, seed, quant=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, Hkv * G, D, device=dev, generator=gen).to(dtype)
    if quant:
        k = torch.randint(-127, 128, (B, Hkv, C, D), device=dev, generator=gen, dtype=torch.int8)
        v = torch.randint(-127, 128, (B, Hkv, C, D), device=dev, generator=gen, dtype=torch.int8)
        ks = torch.rand(B, Hkv, C, device=dev, generator=gen) * 0.05 + 0.005
        vs = torch.rand(B, Hkv, C, device=dev, generator=gen) * 0.05 + 0.005
    else:
        k = torch.randn(B, Hkv, C, D, device=dev, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, C, D, device=dev, generator=gen).to(dtype)
        ks = vs = None
    L = torch.randint(0, C + 1, (B, Hkv), device=dev, generator=gen)
    L.view(-1)[0] = 0
    L.view(-1)[1] = C
    L.view(-1)[2] = 1
    dead = torch.arange(C, device=dev)[None, None, :] >= L[..., None]
    if quant:
        ks.masked_fill_(dead, float("nan"))
        vs.masked_fill_(dead, float("inf"))
    else:
        k.masked_fill_(dead[..., None], float("nan"))
        v.masked_fill_(dead[..., None], float("inf"))
    return q, k, v, L, ks, vs


def _check_vs_reference(out, q, k, v, L, ks=None, vs=None, split_size=None, tol=1e-2):
    ref = decode_attention_reference(q, k, v, L, k_scale=ks, v_scale=vs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    G = q.shape[1] // L.shape[1]
    zero = (L == 0).repeat_interleave(G, dim=1)
    assert (out[zero] == 0).all()
    err = rel_err(out.float(), ref.float())
    assert err < tol, (err, split_size)


@pytest.mark.gpu
@pytest.mark.parametrize("split_size", [None, 64, 256, 1000])
def test_gpu_bf16_realistic(split_size):
    from dms_flex.kernels import decode as dk

    q, k, v, L, _, _ = _cuda_inputs(8, 8, 4, 128, 4096, torch.bfloat16, seed=1)
    out = decode_attention(q, k, v, L, split_size=split_size)
    torch.cuda.synchronize()
    _check_vs_reference(out, q, k, v, L, split_size=split_size)
    # every output element written, stale partials never read
    out2 = dk._launch(q, k, v, L, None, split_size, poison=True)
    torch.cuda.synchronize()
    _check_vs_reference(out2, q, k, v, L, split_size=split_size)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,D,G,B,C",
    [
        (torch.bfloat16, 64, 4, 8, 3000),
        (torch.float16, 128, 4, 4, 2048),
        (torch.float32, 128, 4, 2, 1024),
        (torch.bfloat16, 128, 1, 4, 2048),
        (torch.bfloat16, 128, 8, 4, 2048),
        (torch.bfloat16, 64, 3, 2, 777),
        (torch.bfloat16, 128, 4, 64, 512),  # single-split path
        (torch.bfloat16, 128, 4, 1, 65536),  # many splits
        (torch.bfloat16, 128, 4, 16, 4224),  # long streams: one program per (row, KV head), 128-slot tiles
        (torch.float16, 64, 3, 48, 4100),  # the same at D=64
        (torch.float32, 128, 4, 16, 4224),  # the same in float32 (64-slot tiles, 3 stages)
    ],
)
def test_gpu_dtypes_and_shapes(dtype, D, G, B, C):
    from dms_flex.kernels import decode as dk

    q, k, v, L, _, _ = _cuda_inputs(B, 8, G, D, C, dtype, seed=2)
    out = dk._launch(q, k, v, L, None, None, poison=True)
    torch.cuda.synchronize()
    _check_vs_reference(out, q, k, v, L, tol=1e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,C", [(4, 2048), (16, 4224)])  # (16, 4224): the long-stream rule, two splits
def test_gpu_int8_cache(dtype, B, C):
    from dms_flex.kernels import decode as dk

    q, k, v, L, ks, vs = _cuda_inputs(B, 8, 4, 128, C, dtype, seed=3, quant=True)
    out = decode_attention(q, k, v, L, k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    _check_vs_reference(out, q, k, v, L, ks, vs)
    # fp16 dots on the codes, each conversion (PTX, plain integer ops, the folded offset): every element
    # written, within fp16 rounding of q and p
    for cvt in (True, *dk.F16_CVTS):
        out16 = dk._launch(q, k, v, L, None, None, ks, vs, poison=True, f16=cvt)
        torch.cuda.synchronize()
        _check_vs_reference(out16, q, k, v, L, ks, vs)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_and_cuda_graph():
    q, k, v, L, _, _ = _cuda_inputs(8, 8, 4, 128, 4096, torch.bfloat16, seed=4)

    def step(q, k, v, L):
        return decode_attention(q * 1.0, k, v, L) + 0.0

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k, v, L)
    torch.cuda.synchronize()
    _check_vs_reference(out, q, k, v, L)

    # capture eager and compiled calls in CUDA graphs (warm up on a side stream first)
    for i, fn in enumerate((lambda: decode_attention(q, k, v, L), lambda: compiled(q, k, v, L))):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn()
        # new values in the same buffers, then replay: the graph must read them
        q2, k2, v2, L2, _, _ = _cuda_inputs(8, 8, 4, 128, 4096, torch.bfloat16, seed=5 + i)
        q.copy_(q2)
        k.copy_(k2)
        v.copy_(v2)
        L.copy_(L2)
        graph.replay()
        torch.cuda.synchronize()
        _check_vs_reference(static_out, q, k, v, L)


@pytest.mark.gpu
def test_gpu_reduce_overhead_compile():
    q, k, v, L, _, _ = _cuda_inputs(4, 8, 4, 64, 2048, torch.bfloat16, seed=6)
    f = torch.compile(lambda q, k, v, L: decode_attention(q, k, v, L), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = f(q, k, v, L)
    torch.cuda.synchronize()
    _check_vs_reference(out.clone(), q, k, v, L)


if __name__ == "__main__":
    if "--interp-worker" in sys.argv:
        _interp_worker()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
