"""Tests for dms_flex.kernels.train_attention (the Triton DMS training attention, fwd + bwd).

CPU machines:
  * the dense reference (`dense_dms_attention`) against an independent float64 loop reference;
  * document bounds, the CPU fallback of the public API, shape errors, the `backend="triton"`
    branch of `dms_attention`;
  * the Triton kernels through Triton's CPU interpreter, in ONE subprocess (TRITON_INTERPRET=1
    must be set before triton is imported and must not leak into this process): output and the
    gradients of q, k, v and log_keep against the float64 loop and against autograd through the
    dense reference in float64; every output element written (NaN poison); and the per-class
    block counts against a brute-force classification of every (query block, key block) pair
    (the fast classes take every block they can, nothing is visited twice or skipped);
  * an offline sm_90 compile of the real kernels (no spills, wgmma) and a fake-CUDA trace of the
    custom ops, through `benchmarks/bench_train_attention_kernel.py --aot --aot-quick`.
GPU machines (`-m gpu`): bf16 at B=2, T=4096, Hq=8, Hkv=2, D=64/128, packed documents, against the
reference in fp32; poison, determinism, odd lengths, torch.compile, block counts at real sizes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import zlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests import _interp  # noqa: E402
from dms_flex.kernels.reference import dense_dms_attention  # noqa: E402
from dms_flex.kernels import train_attention as ta  # noqa: E402

HAS_TRITON_PKG = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON_PKG, reason="triton is not installed")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def rel_err(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def loop_masks(T, window, doc_ids_row):
    """(allowed, far) (T, T) bool from plain Python loops: causal, same document run, i - j > w."""
    run = [0] * T  # index of the run of equal ids holding t
    for t in range(1, T):
        run[t] = run[t - 1] + int(doc_ids_row is not None and doc_ids_row[t] != doc_ids_row[t - 1])
    allowed = [[False] * T for _ in range(T)]
    far = [[False] * T for _ in range(T)]
    for i in range(T):
        for j in range(i + 1):
            allowed[i][j] = run[i] == run[j]
            far[i][j] = i - j > window
    return torch.tensor(allowed), torch.tensor(far)


def loop_reference(q, k, v, log_keep, window, doc_ids=None, scale=None):
    """float64 DMS attention with masks built by Python loops (independent of masks.py).
    Differentiable in q, k, v, log_keep."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    outs = []
    for b in range(B):
        allowed, far = loop_masks(T, window, None if doc_ids is None else doc_ids[b].tolist())
        rows = []
        for h in range(Hq):
            hk = h // G
            s = (q[b, h].double() @ k[b, hk].double().T) * scale
            s = s + torch.where(far, log_keep[b, hk].double()[None, :], torch.zeros((), dtype=torch.float64))
            s = s.masked_fill(~allowed, float("-inf"))
            rows.append(torch.softmax(s, dim=-1) @ v[b, hk].double())
        outs.append(torch.stack(rows))
    return torch.stack(outs)


def make_docs(kind, B, T, gen):
    if kind is None:
        return None
    ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        if kind == "random":
            cuts = sorted(set(torch.randint(1, T, (4,), generator=gen).tolist()))
        elif kind == "singletons":  # many short documents, some of length 1
            cuts = sorted(set(torch.randint(1, T, (T // 3,), generator=gen).tolist()))
        elif kind == "few":  # two long documents
            cuts = [int(torch.randint(T // 3, 2 * T // 3, (1,), generator=gen))]
        elif kind == "aligned":  # boundaries on multiples of 32 (block boundaries)
            cuts = list(range(32, T, 32))
        elif kind == "unordered":  # contiguous runs whose ids are not increasing
            cuts = sorted(set(torch.randint(1, T, (5,), generator=gen).tolist()))
        else:
            raise ValueError(kind)
        for c in cuts:
            ids[b, c:] += 1
        if kind == "unordered":
            perm = torch.randperm(int(ids[b].max()) + 1, generator=gen) * 7 + 3
            ids[b] = perm[ids[b]]
    return ids


def brute_counts(T, window, doc_ids, BM, BN, rows_per_program=1):
    """Per-class counts of block pairs [masked, far, near] for the row-block/col-block geometry
    BM x BN, by checking every element of every pair (rows and keys < T only)."""
    B = 1 if doc_ids is None else doc_ids.shape[0]
    masked = far_n = near_n = 0
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for b in range(B):
        vis = j <= i
        if doc_ids is not None:
            d = doc_ids[b]
            new = torch.ones(T, dtype=torch.bool)
            new[1:] = d[1:] != d[:-1]
            run = torch.cumsum(new.long(), 0)
            vis = vis & (run[:, None] == run[None, :])
        is_far = (i - j) > window
        for m0 in range(0, T, BM):
            for n0 in range(0, T, BN):
                v_ = vis[m0 : m0 + BM, n0 : n0 + BN]
                f_ = is_far[m0 : m0 + BM, n0 : n0 + BN]
                if not v_.any():
                    continue
                if v_.all() and f_.all():
                    far_n += 1
                elif v_.all() and not f_.any():
                    near_n += 1
                else:
                    masked += 1
    return [masked * rows_per_program, far_n * rows_per_program, near_n * rows_per_program]


# ----------------------------------------------------------------------------------------------
# CPU: references, helpers, fallback
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _start_subprocesses_early(request):
    """The sm_90 compile runs in a subprocess; start it before the in-process tests when any test selected
    needs it or the interpreter results (whose worker tests/conftest.py prefetches), so they overlap."""
    wanted = ("test_triton_kernels_interpreter", "test_interpreter_cases_cover", "test_aot_compile")
    if HAS_TRITON_PKG and any(item.name.startswith(wanted) for item in request.session.items):
        _subprocesses()
    yield


@pytest.mark.parametrize("window,doc", [(0, None), (3, None), (5, "random"), (2, "singletons"), (100, "random")])
def test_dense_reference_matches_loop(window, doc):
    gen = torch.Generator().manual_seed(window)
    B, Hq, Hkv, T, D = 2, 4, 2, 23, 8
    q = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    lk = F.logsigmoid(3 * torch.randn(B, Hkv, T, generator=gen, dtype=torch.float64))
    ids = make_docs(doc, B, T, gen)
    a = dense_dms_attention(q, k, v, lk, window, doc_ids=ids)
    b = loop_reference(q, k, v, lk, window, ids)
    assert rel_err(a, b) < 1e-7  # the dense reference rounds log_keep to fp32


def test_doc_bounds():
    gen = torch.Generator().manual_seed(1)
    for kind in ("random", "singletons", "aligned", "unordered"):
        ids = make_docs(kind, 3, 77, gen)
        ds, de = ta.doc_bounds(ids)
        assert ds.dtype == torch.int32 and de.dtype == torch.int32
        for b in range(3):
            row = ids[b].tolist()
            for t in range(77):
                s = t
                while s > 0 and row[s - 1] == row[t]:
                    s -= 1
                e = t + 1
                while e < 77 and row[e] == row[t]:
                    e += 1
                assert (int(ds[b, t]), int(de[b, t])) == (s, e)


def _small_inputs(B=2, Hq=4, Hkv=2, T=19, D=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype).requires_grad_()
    lk = F.logsigmoid(3 * torch.randn(B, Hkv, T, generator=gen)).requires_grad_()
    return q, k, v, lk


@pytest.mark.skipif(ta.interpreting(), reason="TRITON_INTERPRET=1 routes CPU tensors to the kernels")
def test_cpu_falls_back_to_dense_reference():
    q, k, v, lk = _small_inputs()
    ids = make_docs("random", 2, 19, torch.Generator().manual_seed(3))
    out = ta.dms_train_attention(q, k, v, lk, 4, doc_ids=ids)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v, lk), go)
    ref = dense_dms_attention(q, k, v, lk, 4, doc_ids=ids)
    g2 = torch.autograd.grad(ref, (q, k, v, lk), go)
    assert torch.equal(out, ref)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.skipif(ta.interpreting(), reason="TRITON_INTERPRET=1 routes CPU tensors to the kernels")
def test_attention_backend_triton_branch():
    from dms_flex import attention

    q, k, v, lk = _small_inputs(seed=4)
    out = attention.dms_attention(q, k, v, lk, 3, backend="triton")
    assert torch.equal(out, dense_dms_attention(q, k, v, lk, 3))


def test_auto_backend_rule(monkeypatch):
    """ "auto": dense off CUDA or for heads under 16; on CUDA the Triton kernel, also inside
    torch.compile (the flag off: flex)."""
    from dms_flex import attention

    x = torch.zeros(1, 2, 4, 16)
    assert attention.resolve_backend("cpu", 16) == "dense"
    assert not attention.flex_supported("cuda", 8) and attention.flex_supported("cuda", 16)
    assert attention.resolve_backend("cuda", 16) == "triton"
    assert attention.resolve_backend("cuda", 8) == "dense"

    def pick(t):
        return t + (1.0 if attention.resolve_backend("cuda", t.shape[-1]) == "triton" else 2.0)

    torch._dynamo.reset()
    assert float(torch.compile(pick, backend="eager")(x).flatten()[0]) == 1.0  # the kernel when compiling too
    monkeypatch.setattr(attention, "USE_TRITON_TRAIN_KERNEL", False)
    assert attention.resolve_backend("cuda", 16) == "flex"


def test_shape_errors():
    q, k, v, lk = _small_inputs()
    with pytest.raises(ValueError):
        ta.dms_train_attention(q[:, :3], k, v, lk, 2)  # Hq not a multiple of Hkv
    with pytest.raises(ValueError):
        ta.dms_train_attention(q, k, v, lk[:, :1], 2)
    with pytest.raises(ValueError):
        ta.dms_train_attention(q, k, v, lk, -1)
    with pytest.raises(ValueError):
        ta.dms_train_attention(q, k, v, lk, 2, doc_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        ta._kernel_dtype_ok(q[..., :12], k[..., :12], v[..., :12])  # head dim not a power of two


def test_default_configs_are_consistent():
    for D in (64, 128):
        c = ta.default_config(D, torch.bfloat16)
        for key in ("fwd", "dkdv", "dq"):
            bm, bn, warps, stages = c[key]
            assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0
            assert warps in (4, 8) and 1 <= stages <= 4
        assert c["masked_stages"] >= 1


def _stand_in_parts(q, k, v, lk, ds, window, scale):
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
    pos = torch.arange(T)
    start = ds.long()[:, :, None] if ds is not None else torch.zeros(B, T, 1, dtype=torch.long)
    allowed = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= start)
    far = (pos[:, None] - pos[None, :]) > window
    bias = torch.where(far[None, None], lk.repeat_interleave(G, 1)[:, :, None, :], 0.0)
    s = q.float() @ kk.transpose(-1, -2) * scale + bias.masked_fill(~allowed[:, None], float("-inf"))
    return s, kk, vv, far, G


@torch.library.custom_op("dms_flex_test::train_attention_fwd", mutates_args=())
def _stand_in_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    doc_start: Optional[torch.Tensor],
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    s, kk, vv, far, G = _stand_in_parts(q, k, v, log_keep, doc_start, window, scale)
    return (torch.softmax(s, -1) @ vv).to(q.dtype), torch.logsumexp(s, -1) / math.log(2)


@_stand_in_fwd.register_fake
def _(q, k, v, log_keep, doc_start, window, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("dms_flex_test::train_attention_bwd", mutates_args=())
def _stand_in_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    doc_start: Optional[torch.Tensor],
    doc_end: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s, kk, vv, far, G = _stand_in_parts(q, k, v, log_keep, doc_start, window, scale)
    B, Hq, T, D = q.shape
    p = torch.softmax(s, -1)
    dp = do.float() @ vv.transpose(-1, -2)
    ds_ = p * (dp - (do.float() * (p @ vv)).sum(-1, keepdim=True))
    dq = ds_ @ kk * scale
    dk = (ds_.transpose(-1, -2) @ q.float() * scale).view(B, -1, G, T, D).sum(2)
    dv = (p.transpose(-1, -2) @ do.float()).view(B, -1, G, T, D).sum(2)
    dlk = (ds_ * far).sum(2).view(B, -1, G, T).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlk


@_stand_in_bwd.register_fake
def _(do, q, k, v, log_keep, doc_start, doc_end, out, lse, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(log_keep)


def test_autograd_function_under_torch_compile(monkeypatch):
    """dms_train_attention (doc_bounds + the autograd.Function around the two custom ops) traces
    with fullgraph=True and matches eager. The Triton ops need CUDA, so CPU stand-in ops with the
    same signatures and semantics take their place; the GPU test compiles the real ones."""
    monkeypatch.setattr(ta, "_FWD_OP", torch.ops.dms_flex_test.train_attention_fwd)
    monkeypatch.setattr(ta, "_BWD_OP", torch.ops.dms_flex_test.train_attention_bwd)
    monkeypatch.setattr(ta, "_use_ops", lambda t: True)
    monkeypatch.setattr(ta, "_INTERPRETING", True)  # route CPU tensors to the Function
    import torch._dynamo as dynamo

    dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D = 2, 4, 2, 33, 16
    q = torch.randn(B, Hq, T, D, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=gen, requires_grad=True)
    logits = torch.randn(B, Hkv, T, generator=gen, requires_grad=True)
    ids = make_docs("random", B, T, gen)
    go = torch.randn(B, Hq, T, D, generator=gen)

    def step(q, k, v, logits):
        return ta.dms_train_attention(q * 1.0, k, v, F.logsigmoid(-logits / 0.1), 5, doc_ids=ids) * 2.0

    def ref_step(q, k, v, logits):
        return dense_dms_attention(q * 1.0, k, v, F.logsigmoid(-logits / 0.1), 5, doc_ids=ids) * 2.0

    def run(fn):
        out = fn(q, k, v, logits)
        return (out,) + torch.autograd.grad(out, (q, k, v, logits), go)

    ref = run(ref_step)
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b, c in zip(ref, eager, compiled):
        assert rel_err(b, a) < 1e-5 and rel_err(c, a) < 1e-5
    dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter (one subprocess for all cases)
# ----------------------------------------------------------------------------------------------
CFG_16 = dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))
CFG_A = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
CFG_B = dict(fwd=(16, 32, 4, 1), dkdv=(32, 16, 4, 1), dq=(16, 32, 4, 1))  # blocks that do not nest
CFG_GPU = "gpu"  # the bf16 GPU defaults for D=64 (block geometry only; fp32 inputs here)


def _interp_cases():
    cases = []

    def add(**p):
        p.setdefault("B", 1)
        p.setdefault("Hq", 2)
        p.setdefault("Hkv", 1)
        p.setdefault("D", 16)
        p.setdefault("doc", None)
        p.setdefault("cfg", "16")
        p.setdefault("dtype", "float32")
        p.setdefault("lk", "soft")
        p.setdefault("api", False)
        p.setdefault("scale", None)
        p.setdefault("strided", False)
        cid = "-".join(f"{k}={v}" for k, v in sorted(p.items()))
        cases.append((cid, p))

    # window boundaries: immediate eviction, w = 1, small windows, w >= T (nothing far)
    add(T=37, window=0)
    add(T=50, window=1, Hq=4, Hkv=2, D=32, cfg="A")
    add(T=64, window=5, Hq=4, Hkv=1)
    add(T=45, window=1000, Hq=2, Hkv=2)
    # all classes (NEAR needs w >= BM + BN - 1): lengths that are and are not block multiples
    add(T=160, window=40, Hq=2, Hkv=1)
    add(T=150, window=37, Hq=2, Hkv=1, cfg="A")
    add(T=133, window=32, Hq=2, Hkv=1, cfg="B")
    # packed documents
    add(T=100, window=17, B=2, Hq=4, Hkv=1, doc="random", cfg="A")
    add(T=40, window=3, doc="singletons", Hq=2, Hkv=2)
    add(T=128, window=20, Hq=2, Hkv=1, doc="aligned")
    add(T=96, window=40, doc="unordered", Hq=4, Hkv=2, cfg="B")
    add(T=120, window=0, doc="random", Hq=2, Hkv=1)
    # hard decisions: every key evicted once far (-inf), and a mix of -inf and soft values
    add(T=70, window=3, Hq=4, Hkv=2, doc="random", lk="neginf")
    add(T=70, window=7, Hq=4, Hkv=2, lk="mixed", cfg="A")
    # real head dims; the GPU block geometry; fp32 default config; bf16/fp16 (upcast in the kernel)
    add(T=40, window=9, D=64, Hq=2, Hkv=1, cfg="A")
    add(T=33, window=4, D=128, Hq=2, Hkv=2)
    add(T=520, window=256, D=16, Hq=2, Hkv=1, doc="few", cfg=CFG_GPU)
    add(T=300, window=100, D=16, Hq=2, Hkv=1, cfg=CFG_GPU)
    add(T=64, window=20, D=16, Hq=2, Hkv=1, cfg="default")
    add(T=70, window=9, Hq=4, Hkv=2, doc="random", dtype="bfloat16", cfg="A")
    add(T=70, window=9, Hq=2, Hkv=1, dtype="float16")
    # dQ through fp32 atomics in the dK/dV kernel instead of the dQ kernel
    add(T=120, window=37, Hq=4, Hkv=1, doc="random", cfg="A_atomic")
    add(T=61, window=3, Hq=2, Hkv=2, cfg="16_atomic")
    # the public API (autograd.Function, doc_bounds), strided inputs, a custom scale
    add(T=60, window=11, B=2, Hq=2, Hkv=1, doc="random", api=True, cfg="default")
    add(T=50, window=6, Hq=4, Hkv=2, api=True, strided=True, scale=0.3, cfg="default")
    return cases


def _cfg_of(name):
    if name == "gpu":
        return {k: v for k, v in ta.default_config(64, torch.bfloat16).items()}
    if name == "default":
        return None
    if name.endswith("_atomic"):
        return dict(_cfg_of(name[: -len("_atomic")]), dq_atomic=True)
    return {"16": CFG_16, "A": CFG_A, "B": CFG_B}[name]


def _run_interp_case(p):
    gen = torch.Generator().manual_seed(zlib.crc32(json.dumps(p, sort_keys=True).encode()))
    B, Hq, Hkv, T, D, w = p["B"], p["Hq"], p["Hkv"], p["T"], p["D"], p["window"]
    dtype = getattr(torch, p["dtype"])
    q = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    lk = F.logsigmoid(3 * torch.randn(B, Hkv, T, generator=gen, dtype=torch.float64))
    if p["lk"] == "neginf":
        lk = torch.full_like(lk, float("-inf"))
    elif p["lk"] == "mixed":
        lk = lk.masked_fill(torch.rand(lk.shape, generator=gen) < 0.3, float("-inf"))
    ids = make_docs(p["doc"], B, T, gen)
    go = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64).to(dtype).double()
    # inputs as the kernel sees them (rounded to its dtype); references in float64 from the same values
    qk, kk, vk = (x.to(dtype) for x in (q, k, v))
    lkk = lk.float()
    q64, k64, v64 = (x.double().requires_grad_() for x in (qk, kk, vk))
    lk64 = lkk.double().requires_grad_()
    scale = p["scale"]

    res = {}
    if p["lk"] == "neginf":
        # every key is gone once far: row i attends exactly to its own document's keys in
        # [i - w, i] (i - j = w still visible, w + 1 not)
        ref = _window_only_reference(q64, k64, v64, w, ids, scale)
        gref = torch.autograd.grad(ref, (q64, k64, v64), go)
        gref = gref + (torch.zeros_like(lk64),)
    else:
        ref = loop_reference(q64, k64, v64, lk64, w, ids, scale)
        gref = torch.autograd.grad(ref, (q64, k64, v64, lk64), go)
        dense = dense_dms_attention(q64, k64, v64, lk64, w, doc_ids=ids, scale=scale)
        gdense = torch.autograd.grad(dense, (q64, k64, v64, lk64), go)
        res["dense_vs_loop"] = max(rel_err(dense, ref), *(rel_err(a, b) for a, b in zip(gdense, gref)))

    if p["api"]:
        qa, ka, va = (x.clone() for x in (qk, kk, vk))
        lka = lkk.clone()
        if p["strided"]:  # (B, T, H, D) buffers viewed as (B, H, T, D); log_keep as a (B, T, Hkv) view
            qa = qa.transpose(1, 2).contiguous().transpose(1, 2)
            ka = ka.transpose(1, 2).contiguous().transpose(1, 2)
            va = va.transpose(1, 2).contiguous().transpose(1, 2)
            lka = lka.transpose(1, 2).contiguous().transpose(1, 2)
            assert not qa.is_contiguous() and not lka.is_contiguous()
        leaves = [x.requires_grad_() for x in (qa, ka, va, lka)]
        out = ta.dms_train_attention(qa, ka, va, lka, w, doc_ids=ids, scale=scale)
        grads = torch.autograd.grad(out, leaves, go.to(dtype))
        counts = None
    else:
        cfg = _cfg_of(p["cfg"])
        counts = torch.zeros(9, dtype=torch.int32)
        ds = de = None
        if ids is not None:
            ds, de = ta.doc_bounds(ids)
        sc = D**-0.5 if scale is None else scale
        out, lse = ta._launch_fwd(qk, kk, vk, lkk, ds, w, sc, cfg=cfg, poison=True, counts=counts)
        grads = ta._launch_bwd(
            go.to(dtype), qk, kk, vk, lkk, ds, de, out, lse, w, sc, cfg=cfg, poison=True, counts=counts
        )
        c = ta._cfg(cfg, D, dtype)
        (bm, bn, _, _), (bm1, bn1, _, _), (bm2, bn2, _, _) = c["fwd"], c["dkdv"], c["dq"]
        res["counts"] = counts.tolist()
        res["brute_fwd"] = brute_counts(T, w, ids, bm, bn, Hq)
        # the dK/dV kernel walks query blocks (BM1) for key blocks (BN1): same pairs, transposed
        res["brute_dkdv"] = brute_counts(T, w, ids, bm1, bn1, Hq)
        res["brute_dq"] = brute_counts(T, w, ids, bm2, bn2, Hq)
        # the classification is exact when blocks nest and T is a multiple of the blocks (rows or
        # keys past T make a pair look mixed to the kernel)
        res["dq_atomic"] = bool(c.get("dq_atomic", False))
        res["exact"] = dict(
            fwd=bm % bn == 0 and T % bm == 0, dkdv=bn1 % bm1 == 0 and T % bn1 == 0, dq=bm2 % bn2 == 0 and T % bm2 == 0
        )
    names = ("out", "dq", "dk", "dv", "dlk")
    got = (out,) + tuple(grads)
    want = (ref,) + tuple(gref)
    res["finite"] = {n: bool(torch.isfinite(g).all()) for n, g in zip(names, got)}
    res["err"] = {}
    for n, g, r in zip(names, got, want):
        if r.norm() == 0:
            res["err"][n] = float(g.double().abs().max())
        else:
            res["err"][n] = rel_err(g, r)
    res["dtypes_ok"] = (
        out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype and grads[3].dtype == torch.float32
    )
    return res


def _window_only_reference(q, k, v, window, ids, scale):
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    outs = []
    for b in range(B):
        allowed, _ = loop_masks(T, window, None if ids is None else ids[b].tolist())
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        allowed = allowed & (i - j <= window)
        rows = []
        for h in range(Hq):
            s = (q[b, h] @ k[b, h // G].T) * scale
            rows.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v[b, h // G])
        outs.append(torch.stack(rows))
    return torch.stack(outs)


def _interp_worker():
    _interp.run_worker(_interp_cases(), _run_interp_case)


@functools.lru_cache(maxsize=None)
def _subprocesses():
    """Start the offline sm_90 compile the first time it is needed (the interpreter worker is prefetched by
    tests/conftest.py: on 2-core CI machines they overlap the in-process tests)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env_aot = dict(env)
    env_aot.pop("TRITON_INTERPRET", None)
    aot = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_train_attention_kernel.py"), "--aot", "--aot-quick"],
        env=env_aot,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    return {"aot": aot}


@functools.lru_cache(maxsize=None)
def _finished(name):
    proc = _subprocesses()[name]
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


@functools.lru_cache(maxsize=None)
def _interp_results():
    return _interp.results(__file__)


@needs_triton
@pytest.mark.parametrize("cid,params", _interp_cases(), ids=[c for c, _ in _interp_cases()])
def test_triton_kernels_interpreter(cid, params):
    r = _interp_results()[cid]
    assert "error" not in r, r.get("error")
    assert all(r["finite"].values()), r["finite"]  # NaN poison: every element written, no inf - inf
    assert r["dtypes_ok"]
    if "dense_vs_loop" in r:
        assert r["dense_vs_loop"] < 1e-6  # it rounds log_keep (and its gradient) to fp32
    tol = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3}[params["dtype"]]
    for name, e in r["err"].items():
        assert e < tol, (name, r["err"])
    if "counts" in r:
        c = r["counts"]
        for kernel, off, brute in (("fwd", 0, r["brute_fwd"]), ("dkdv", 3, r["brute_dkdv"]), ("dq", 6, r["brute_dq"])):
            got = c[off : off + 3]
            if kernel == "dq" and r["dq_atomic"]:
                assert got == [0, 0, 0]  # no dQ kernel
                continue
            # every block pair with a visible element is visited exactly once
            assert sum(got) == sum(brute), (kernel, got, brute)
            # fast classes only where every element qualifies (numerics check this too) ...
            assert got[1] <= brute[1] and got[2] <= brute[2], (kernel, got, brute)
            # ... and wherever every element qualifies
            if r["exact"][kernel]:
                assert got[1:] == brute[1:], (kernel, got, brute)


@needs_triton
def test_interpreter_cases_cover_every_block_class():
    res = _interp_results()
    totals = [0] * 9
    for cid, _ in _interp_cases():
        for i, c in enumerate(res[cid].get("counts", [0] * 9)):
            totals[i] += c
    assert all(t > 0 for t in totals), totals
    assert any(p["cfg"].endswith("_atomic") for _, p in _interp_cases())


# ----------------------------------------------------------------------------------------------
# offline sm_90 compile + fake-CUDA trace (subprocess)
# ----------------------------------------------------------------------------------------------
@needs_triton
def test_aot_compile_sm90_and_op_trace():
    rc, out, err = _finished("aot")
    assert rc == 0, out[-4000:] + err[-4000:]
    rep = json.loads(out.split("@@AOT@@", 1)[1])
    if rep.get("skipped"):
        pytest.skip(rep["skipped"])
    assert rep["kernels"], rep
    for row in rep["kernels"]:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert row["shared"] <= 227 * 1024, row
        if row["kernel"] != "preprocess":
            assert row["wgmma"] > 0, row  # Hopper tensor-core path
    assert rep["trace"]["ok"], rep["trace"]


# ----------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------
def _gpu_inputs(B, Hq, Hkv, T, D, dtype, seed, docs=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, T, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=gen).to(dtype)
    # decision logits as in training: log(1 - alpha) with alpha = sigmoid((l + noise) / tau)
    lk = F.logsigmoid(-torch.randn(B, Hkv, T, device="cuda", generator=gen) * 3)
    ids = None
    if docs:
        ids = torch.zeros(B, T, dtype=torch.long, device="cuda")
        cuts = torch.randint(1, T, (B, 6), device="cuda", generator=gen)
        for b in range(B):
            for c in cuts[b].tolist():
                ids[b, c:] += 1
    go = torch.randn(B, Hq, T, D, device="cuda", generator=gen).to(dtype)
    return q, k, v, lk, ids, go


def _grads(fn, q, k, v, lk, go):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, lk)]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, go)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [256, 0, 512])
def test_gpu_bf16_matches_reference(D, window):
    q, k, v, lk, ids, go = _gpu_inputs(2, 8, 2, 4096, D, torch.bfloat16, seed=D + window)
    got = _grads(lambda q, k, v, lk: ta.dms_train_attention(q, k, v, lk, window, doc_ids=ids), q, k, v, lk, go)
    ref = _grads(
        lambda q, k, v, lk: dense_dms_attention(q.float(), k.float(), v.float(), lk, window, doc_ids=ids),
        q,
        k,
        v,
        lk,
        go.float(),
    )
    torch.cuda.synchronize()
    errs = {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv", "dlk"), got, ref)}
    for n, a in zip(("out", "dq", "dk", "dv", "dlk"), got):
        assert torch.isfinite(a).all(), n
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,D,G,T,docs",
    [
        (torch.bfloat16, 64, 4, 1000, False),
        (torch.float16, 128, 1, 777, True),
        (torch.bfloat16, 128, 8, 2049, True),
        (torch.float32, 64, 2, 300, True),
    ],
)
def test_gpu_shapes_poison_determinism(dtype, D, G, T, docs):
    Hkv = 2
    q, k, v, lk, ids, go = _gpu_inputs(2, Hkv * G, Hkv, T, D, dtype, seed=T, docs=docs)
    ds = de = None
    if ids is not None:
        ds, de = ta.doc_bounds(ids)
    scale = D**-0.5
    cfg = dict(dq_atomic=False)
    out, lse = ta._launch_fwd(q, k, v, lk, ds, 64, scale, poison=True)
    g1 = ta._launch_bwd(go, q, k, v, lk, ds, de, out, lse, 64, scale, poison=True, cfg=cfg)
    g2 = ta._launch_bwd(go, q, k, v, lk, ds, de, out, lse, 64, scale, poison=True, cfg=cfg)
    torch.cuda.synchronize()
    for a, b in zip(g1, g2):  # no atomics: bitwise deterministic
        assert torch.equal(a, b)
    ref = _grads(
        lambda q, k, v, lk: dense_dms_attention(q.float(), k.float(), v.float(), lk, 64, doc_ids=ids),
        q,
        k,
        v,
        lk,
        go.float(),
    )
    tol = 2e-2 if dtype == torch.bfloat16 else (5e-3 if dtype == torch.float16 else 1e-4)
    for n, a, b in zip(("out", "dq", "dk", "dv", "dlk"), (out,) + tuple(g1), ref):
        assert torch.isfinite(a).all(), n
        assert rel_err(a, b) < tol, (n, rel_err(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_atomic_dq_matches_reference(D):
    """The dq_atomic variant (dQ accumulated with fp32 atomics in the dK/dV kernel)."""
    q, k, v, lk, ids, go = _gpu_inputs(2, 8, 2, 4096, D, torch.bfloat16, seed=3 + D)
    ds, de = ta.doc_bounds(ids)
    scale = D**-0.5
    cfg = dict(dq_atomic=True, dkdv=(32, 128, 8, 3) if D == 64 else (16, 64, 8, 3))
    out, lse = ta._launch_fwd(q, k, v, lk, ds, 256, scale)
    got = (out,) + tuple(ta._launch_bwd(go, q, k, v, lk, ds, de, out, lse, 256, scale, cfg=cfg, poison=True))
    ref = _grads(
        lambda q, k, v, lk: dense_dms_attention(q.float(), k.float(), v.float(), lk, 256, doc_ids=ids),
        q,
        k,
        v,
        lk,
        go.float(),
    )
    for n, a, b in zip(("out", "dq", "dk", "dv", "dlk"), got, ref):
        assert torch.isfinite(a).all(), n
        assert rel_err(a, b) < 2e-2, (n, rel_err(a, b))


@pytest.mark.gpu
def test_gpu_block_counts_at_real_block_sizes():
    """The per-class block counts with the real GPU block sizes equal the brute-force ones."""
    T, window, D = 2048, 256, 64
    q, k, v, lk, ids, go = _gpu_inputs(1, 2, 1, T, D, torch.bfloat16, seed=7, docs=True)
    for doc_ids in (None, ids):
        ds = de = None
        if doc_ids is not None:
            ds, de = ta.doc_bounds(doc_ids)
        counts = torch.zeros(9, dtype=torch.int32, device="cuda")
        out, lse = ta._launch_fwd(q, k, v, lk, ds, window, D**-0.5, counts=counts)
        ta._launch_bwd(go, q, k, v, lk, ds, de, out, lse, window, D**-0.5, counts=counts)
        c = ta.default_config(D, torch.bfloat16)
        ids_cpu = None if doc_ids is None else doc_ids.cpu()
        got = counts.tolist()
        for off, (bm, bn) in ((0, c["fwd"][:2]), (3, c["dkdv"][:2]), (6, c["dq"][:2])):
            brute = brute_counts(T, window, ids_cpu, bm, bn, 2)
            assert sum(got[off : off + 3]) == sum(brute), (off, got, brute)
            assert got[off + 1] <= brute[1] and got[off + 2] <= brute[2], (off, got, brute)


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager():
    q, k, v, lk, ids, go = _gpu_inputs(1, 8, 2, 2048, 64, torch.bfloat16, seed=11)

    def step(q, k, v, lk):
        return ta.dms_train_attention(q * 1.0, k, v, lk * 1.0, 128, doc_ids=ids) * 2.0

    eager = _grads(step, q, k, v, lk, go)
    compiled = _grads(torch.compile(step, fullgraph=True), q, k, v, lk, go)
    torch.cuda.synchronize()
    for n, a, b in zip(("out", "dq", "dk", "dv", "dlk"), compiled, eager):
        assert rel_err(a, b) < 1e-3, (n, rel_err(a, b))


@pytest.mark.gpu
def test_gpu_matches_flex_path():
    from dms_flex.attention import flex_dms_attention

    q, k, v, lk, ids, go = _gpu_inputs(1, 8, 2, 4096, 128, torch.bfloat16, seed=12)
    got = _grads(lambda q, k, v, lk: ta.dms_train_attention(q, k, v, lk, 256, doc_ids=ids), q, k, v, lk, go)
    flex = _grads(lambda q, k, v, lk: flex_dms_attention(q, k, v, lk, 256, doc_ids=ids), q, k, v, lk, go)
    for n, a, b in zip(("out", "dq", "dk", "dv", "dlk"), got, flex):
        assert rel_err(a, b) < 2e-2, (n, rel_err(a, b))


if __name__ == "__main__":
    if "--interp-worker" in sys.argv:
        _interp_worker()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
