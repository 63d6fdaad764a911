"""DMS training attention as a Triton FlashAttention-2-style kernel (forward and backward).

The function (docs/design.md, "Delayed eviction" and "Training relaxation"; the rule lives in masks.py, the reference is
`dms_flex.kernels.reference.dense_dms_attention`): for query i and key j of the same packed document,
j <= i,

    score_ij = q_i . k_j * scale + (log_keep_j  if i - j > window else 0)

softmax over j, times v. log_keep (B, Hkv, T) fp32 is log(1 - alpha) of the decided token and
needs a gradient; GQA: query head h reads KV head h // G, and so does its bias.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, T, D); bf16/fp16 (fp32 for tests: exact "ieee" dots);
D a power of two in [16, 256] (the models: 64, 128); any T; any strides with a contiguous last
dim. doc_ids (B, T): each document is one contiguous run of equal ids (packing); a key is visible
to a query iff it lies in the query's run (the dense reference compares ids, which agrees when a
document's id does not reappear later in the row).

Why a kernel: FlexAttention with a score_mod reading a grad-requiring per-key bias gathers the
bias per element and accumulates its gradient with per-element atomics from every query block
(measured on the H200 before this kernel: 2x flex causal at 8K, 16x SDPA at 32K; benchmarks/RESULTS.md
sections 2 and 8 compare the two paths). Here the bias is one BLOCK_N vector per
key block, and its gradient is a register reduction in the dK/dV program that owns the key
block, stored once: no atomics, deterministic.

Block classes
-------------
For a (query block [m0, m0+BM), key block [n0, n0+BN)) pair, i - j spans
[m0 - (n0 + BN - 1), m0 + BM - 1 - n0]:
  FAR     every i - j > w, all causal and in-document: the bias vector is added to every row.
  NEAR    every i - j <= w, all causal and in-document: plain attention, no bias.
  MASKED  anything else (the diagonal band where j > i is possible, the band that holds
          i - j = w, blocks that cross a document start, the tail past T): element-wise causal,
          document and far masks; the bias is still a vector load broadcast over the rows.
Blocks are aligned (key blocks to BN, query blocks to BM), so for one query block the classes
are contiguous ranges of n0, computed from integers at the start of the program (`_key_ranges`;
no per-block branch, each range its own loop with its mode as a constexpr):
    [lo, doc_end) MASKED | FAR | window band MASKED | NEAR | [diag, hi) MASKED
lo = the block holding the first row's document start (whole blocks before it are never
visited), doc_end = the first block that the last row's document covers, diag = the block
holding m0. The dK/dV kernel walks the query blocks of a key block in the mirrored order
(`_query_ranges`: diagonal, NEAR, window band, FAR, rows past the first key's document end) up
to the last key's document end. Masked blocks per query block: BM/BN on the diagonal plus
~BM/BN + 1 in the window band, out of up to T/BN. With nested block sizes and T a multiple of
them the classification is exact (tests count every block per class against brute force).

Kernels
-------
forward   grid (B*Hq, cdiv(T, BM)), longest rows first: online softmax in fp32 with exp2 (scores
          times scale*log2(e), bias times log2(e)); stores out and the row log-sum-exp (log2
          units, fp32 (B, Hq, T): the only extra saved for backward).
backward  (1) delta = rowsum(dO * O), fp32, grid (B*Hq, cdiv(T, 64)).
          (2) dK, dV, dlog_keep: grid (B*Hkv, cdiv(T, BN1)), the key blocks with the most work
          first. A program holds one key block of one KV head (K, V in shared memory) and walks,
          in one flat loop per class range, (query block, query head of the group) pairs, so the
          G heads of a group meet in one program and dK/dV need no atomics. dS = P*(dP - delta)
          is computed anyway; dlog_keep_j = sum over far (i, h) of dS_ij is a tl.sum over the
          query rows of the fp32 dS (masked to far elements in band blocks), kept in registers
          and stored once per key block.
          (3) dQ: grid (B*Hq, cdiv(T, BM2)), recomputes S and dP per block pair (the same class
          ranges as the forward). Deterministic; costs 2 extra matmul tiles per block pair
          (fwd 2 + dK/dV 4 + dQ 3 = 9 against 7).
          Option `dq_atomic` (config key): no dQ kernel; the dK/dV kernel adds dS @ K * scale
          into an fp32 (B, Hq, T, D) buffer with relaxed vector atomics (7 matmul tiles, not
          bitwise deterministic, +4 bytes per q element of memory). Off by default; the
          benchmark's --sweep times both.
No S x S memory anywhere.

Configs (`_CONFIGS`, per head dim; override with DMS_TRAIN_ATTN_CONFIG or the launch `cfg`):
block sizes, warps, pipeline stages per kernel; `masked_stages` (pipeline depth of the MASKED
loops: they hold a few blocks per program, and pipelining them costs registers);
`dq_atomic`. Inner loops use `tl.range(..., num_stages=...)` so fast and masked loops pipeline
differently.

Numerics: fp32 accumulation; P and dS are rounded to the input dtype for the P@V, dS@Q, dS@K
products (as in FlashAttention); the bias gradient is reduced from the fp32 dS. Rows are never
empty (the diagonal key is always visible). log_keep may hold -inf (hard decisions): rows that
have seen only -inf so far are guarded, so no inf - inf appears.

Triton's CPU interpreter (TRITON_INTERPRET=1 set before triton is imported) runs the same kernels
on CPU tensors; bf16 arithmetic is wrong there, so tiles are converted to fp32 (UPCAST). Without
CUDA and without the interpreter, `dms_train_attention` falls back to the dense reference. On
CUDA the launches are `torch.library.triton_op`s (dms_flex::dms_train_attention_fwd / _bwd)
inside a `torch.autograd.Function`, so torch.compile traces them (fullgraph).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor

try:  # triton is optional on CPU machines
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["dms_train_attention", "doc_bounds", "default_config", "HAS_TRITON"]

# Plain @triton.jit definitions (not `name = triton.jit(name_fn)`): inductor re-emits a user kernel's
# source with the jit helpers it calls under their function names, so the two must agree
# (otherwise torch.compile fails with NameError: '_key_ranges' is not defined).
_jit = triton.jit if HAS_TRITON else (lambda fn: fn)

_LOG2E = 1.4426950408889634

# Block sizes / warps / pipeline depth for 16-bit inputs on sm_90 (H100/H200), per head dim:
#   fwd  (BM, BN, warps, stages): a query block of one head against key blocks of BN
#   dkdv (BM1, BN1, ...): a program holds BN1 keys and walks query blocks of BM1
#   dq   (BM2, BN2, ...): a program holds BM2 queries and walks key blocks of BN2
#   masked_stages: pipeline depth of the MASKED loops (a few blocks per program; deeper
#   pipelining there costs registers for little gain)
# Starting point: FlexAttention's H100 defaults (fwd D=64 128x128 4 warps, D=128 128x64 8 warps;
# bwd 64/128 blocks, 8 warps, 3 stages), moved to what compiles for sm_90 without spills in the
# offline compile (benchmarks/bench_train_attention_kernel.py --aot: 128-row tiles with 4 warps
# and 64x128 dK/dV tiles at D=128 spill). D=64: the H200 sweep's best (benchmarks/RESULTS.md section 18:
# 18-21% faster than the first defaults at 8K and 32K, side by side); its block geometry is what the
# interpreter tests run. D=128: the sweep suggests fwd (64, 32, 4, 3), dkdv (32, 64, 4, 3), dq (64, 32, 4, 3),
# masked_stages 3 (3-13% faster), not adopted until its output is checked on the GPU.
# Override with DMS_TRAIN_ATTN_CONFIG='{"64": {"fwd": [128, 64, 8, 3]}, ...}'.
_CONFIGS = {
    64: dict(fwd=(64, 64, 4, 3), dkdv=(64, 128, 8, 3), dq=(64, 64, 4, 3), masked_stages=1),
    128: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3), masked_stages=1),
}
_LARGE_D_CONFIG = dict(fwd=(64, 32, 8, 2), dkdv=(16, 32, 4, 2), dq=(32, 16, 8, 2), masked_stages=1)  # D > 128
# fp32 inputs (tests) run exact "ieee" dots on the CUDA cores: small tiles keep them out of local memory
_FP32_CONFIGS = {
    64: dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1), masked_stages=1),
    128: dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1), masked_stages=1),
}


def _env_overrides():
    raw = os.environ.get("DMS_TRAIN_ATTN_CONFIG")
    if not raw:
        return
    for d, c in json.loads(raw).items():
        entry = _CONFIGS.setdefault(int(d), dict(_CONFIGS[128]))
        for key, val in c.items():
            entry[key] = tuple(val) if isinstance(val, list) else val


_env_overrides()


def default_config(D: int, dtype: torch.dtype) -> dict:
    """{'fwd': (BM, BN, warps, stages), 'dkdv': (BM1, BN1, ...), 'dq': (BM2, BN2, ...), 'masked_stages'}."""
    if dtype == torch.float32:
        return dict(_FP32_CONFIGS[64 if D <= 64 else 128])
    if D in _CONFIGS:
        return dict(_CONFIGS[D])
    return dict(_CONFIGS[64] if D < 64 else _LARGE_D_CONFIG)


# ----------------------------------------------------------------------------------------------
# Document bounds
# ----------------------------------------------------------------------------------------------
def doc_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(doc_start, doc_end), each (B, T) int32: the first position of t's run of equal ids and
    one past its last. Shapes-only tensor ops (no host sync)."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device, dtype=torch.int32).expand(B, T)
    edge = doc_ids[:, 1:] != doc_ids[:, :-1]  # a document ends at t, the next starts at t + 1
    ones = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    first = torch.cat([ones, edge], dim=1)
    last = torch.cat([edge, ones], dim=1)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos + 1, torch.full_like(pos, T)).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernels (plain functions; decorated below, or run by the interpreter)
# ----------------------------------------------------------------------------------------------
# MODE (constexpr) of an inner loop: 0 NEAR, 1 FAR, 2 MASKED (see the module docstring).
# COUNT (constexpr, tests only): each program adds the number of blocks it runs per class to
# CNT[slot] (fwd 0..2, dK/dV 3..5, dQ 6..8; MASKED, FAR, NEAR), so tests check that the fast
# classes take every block they can and that no block is visited twice or skipped.


@_jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@_jit
def _is_far(q_pos, k_pos, window):
    """masks.is_far inside the kernels: the key has left the query's grace window (i - j > w)."""
    return (q_pos - k_pos) > window


@_jit
def _count(CNT, slot, lo, hi, BLOCK: tl.constexpr, MULT: tl.constexpr):
    tl.atomic_add(CNT + slot, (tl.maximum(hi - lo + BLOCK - 1, 0) // BLOCK) * MULT)


@_jit
def _key_ranges(DS_b, m0, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """Key-block ranges of the query block [m0, m0 + BM), in order:
    [lo, doc_end) MASKED (a row's document starts inside), [far0, far1) FAR, [band0, band1) MASKED
    (holds i - j = w), [near0, diag) NEAR, [diag, hi) MASKED (diagonal, holds j > i)."""
    hi = tl.minimum(m0 + BLOCK_M, T)
    diag = (m0 // BLOCK_N) * BLOCK_N
    if HAS_DOC:
        # doc_start is nondecreasing in i: the first row's bounds the blocks to visit, the last
        # row's bounds the blocks every row fully sees
        lo = (tl.load(DS_b + m0) // BLOCK_N) * BLOCK_N
        doc_end = tl.minimum(((tl.load(DS_b + hi - 1) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, diag)
    else:
        lo = m0 * 0
        doc_end = lo
    # entirely far: n0 + BN - 1 < m0 - w; entirely near: n0 >= m0 + BM - 1 - w
    far_end = (tl.maximum(m0 - window, 0) // BLOCK_N) * BLOCK_N
    near_start = ((tl.maximum(m0 + BLOCK_M - 1 - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    s0 = tl.maximum(lo, doc_end)
    far1 = tl.minimum(far_end, diag)
    band0 = tl.maximum(s0, far_end)
    band1 = tl.minimum(near_start, diag)
    near0 = tl.maximum(s0, near_start)
    return lo, doc_end, s0, far1, band0, band1, near0, diag, hi


@_jit
def _query_ranges(DE_b, n0, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """Query-block ranges that see the key block [n0, n0 + BN), in order:
    [q_lo, diag_end) MASKED (diagonal), [diag_end, near1) NEAR, [band0, band1) MASKED (holds
    i - j = w), [far0, top) FAR, [doc0, q_hi) MASKED (rows past the first key's document end)."""
    q_lo = (n0 // BLOCK_M) * BLOCK_M
    diag_end = ((n0 + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_DOC:
        # rows past the last key's document end see nothing; rows past the first key's
        # document end see part of the block
        q_hi = tl.load(DE_b + tl.minimum(n0 + BLOCK_N, T) - 1)
        top = tl.minimum((tl.load(DE_b + n0) // BLOCK_M) * BLOCK_M, q_hi)
    else:
        q_hi = T + n0 * 0
        top = q_hi
    # entirely near: m0 + BM - 1 - n0 <= w; entirely far: m0 - (n0 + BN - 1) > w
    near_end = ((n0 + window + 1) // BLOCK_M) * BLOCK_M
    far_start = ((n0 + BLOCK_N + window + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    diag1 = tl.minimum(diag_end, q_hi)
    near1 = tl.minimum(near_end, top)
    band0 = tl.maximum(diag_end, near_end)
    band1 = tl.minimum(far_start, top)
    far0 = tl.maximum(diag_end, far_start)
    doc0 = tl.maximum(diag_end, top)
    return q_lo, diag1, diag_end, near1, band0, band1, far0, top, doc0, q_hi


@_jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    lk_base,
    stride_kt,
    stride_vt,
    stride_lt,
    offs_m,
    offs_n,
    offs_d,
    ds_rows,
    lo,
    hi,
    T,
    window,
    qk_scale,
    MODE: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n
        if MODE == 2:
            cmask = cols < T
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=cmask[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cmask[:, None], other=0.0)
        else:  # fast blocks lie before the diagonal: all keys < T
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = _dot(q, tl.trans(k), IEEE)
        if MODE == 0:
            # max before scaling (scale > 0): the exponent is then one FMA per element
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:
            if MODE == 1:  # one BLOCK_N vector, broadcast over the rows
                bias = tl.load(lk_base + cols * stride_lt).to(tl.float32) * 1.4426950408889634
                s = qk * qk_scale + bias[None, :]
            else:
                bias = tl.load(lk_base + cols * stride_lt, mask=cmask, other=0.0).to(tl.float32) * 1.4426950408889634
                far = _is_far(offs_m[:, None], cols[None, :], window)
                s = qk * qk_scale + tl.where(far, bias[None, :], 0.0)
                valid = cols[None, :] <= offs_m[:, None]
                if HAS_DOC:
                    valid = valid & (cols[None, :] >= ds_rows[:, None])
                s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row may have seen only -inf so far (masked keys, a -inf bias)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _fwd_kernel(
    Q,
    K,
    V,
    LK,
    DS,
    O,
    LSE,
    CNT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_ob,
    stride_oh,
    stride_ot,
    T,
    Hq,
    window,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    STAGES: tl.constexpr,
    MASKED_STAGES: tl.constexpr,
    COUNT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows start first
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor may pass Python floats as fp64
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rmask = offs_m < T
    b64 = b.to(tl.int64)

    q = tl.load(
        Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    lk_base = LK + b64 * stride_lb + hk.to(tl.int64) * stride_lh
    DS_b = DS + b64 * T
    if HAS_DOC:
        ds_rows = tl.load(DS_b + offs_m, mask=rmask, other=0)
    else:
        ds_rows = offs_m  # unused
    lo, doc_end, s0, far1, band0, band1, near0, diag, hi = _key_ranges(DS_b, m0, T, window, BLOCK_M, BLOCK_N, HAS_DOC)
    if COUNT:
        _count(CNT, 0, lo, doc_end, BLOCK_N, 1)
        _count(CNT, 1, s0, far1, BLOCK_N, 1)
        _count(CNT, 0, band0, band1, BLOCK_N, 1)
        _count(CNT, 2, near0, diag, BLOCK_N, 1)
        _count(CNT, 0, diag, hi, BLOCK_N, 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if HAS_DOC:
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            lk_base,
            stride_kt,
            stride_vt,
            stride_lt,
            offs_m,
            offs_n,
            offs_d,
            ds_rows,
            lo,
            doc_end,
            T,
            window,
            qk_scale,
            2,
            HAS_DOC,
            UPCAST,
            IEEE,
            BLOCK_N,
            MASKED_STAGES,
        )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        s0,
        far1,
        T,
        window,
        qk_scale,
        1,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        band0,
        band1,
        T,
        window,
        qk_scale,
        2,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        near0,
        diag,
        T,
        window,
        qk_scale,
        0,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        diag,
        hi,
        T,
        window,
        qk_scale,
        2,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past T can be empty
    out = acc / l_safe[:, None]
    tl.store(
        O + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=rmask[:, None],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=rmask)


@_jit
def _bwd_preprocess(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_db,
    stride_dh,
    stride_dt,
    T,
    Hq,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rmask = offs_m < T
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=rmask)


@_jit
def _dkdv_inner(
    dk,
    dv,
    dlk,
    k,
    v,
    bias,
    Q_b,
    DO_b,
    LSE_b,
    DELTA_b,
    DS_b,
    DQA_b,
    stride_qh,
    stride_qt,
    stride_doh,
    stride_dot,
    h0,
    offs_n,
    offs_m0,
    offs_d,
    lo,
    hi,
    T,
    window,
    qk_scale,
    sm_scale,
    MODE: tl.constexpr,
    G: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STAGES: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    D: tl.constexpr,
):
    # Transposed tiles: rows = the program's keys (BLOCK_N), columns = query rows (BLOCK_M).
    # Query rows past T load as zeros (q, dO, lse, delta): every term they add is 0.
    # One flat loop over (query block, head of the group): a loop over heads around the block
    # loops cost ~50 more registers per thread in the sm_90 compile, and spills.
    n_it = (tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M) * G
    for it in tl.range(0, n_it, num_stages=STAGES):
        h = (h0 + it % G).to(tl.int64)
        rows = lo + (it // G) * BLOCK_M + offs_m0
        rmask = rows < T
        q_base = Q_b + h * stride_qh
        do_base = DO_b + h * stride_doh
        qT = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None], mask=rmask[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE_b + h * T + rows, mask=rmask, other=0.0)
        Di = tl.load(DELTA_b + h * T + rows, mask=rmask, other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        sT = _dot(k, qT, IEEE) * qk_scale
        if MODE == 1:
            sT = sT + bias[:, None]
        if MODE == 2:
            far = _is_far(rows[None, :], offs_n[:, None], window)
            sT = sT + tl.where(far, bias[:, None], 0.0)
        pT = tl.exp2(sT - lse[None, :])
        if MODE == 2:
            valid = (offs_n[:, None] <= rows[None, :]) & rmask[None, :]
            if HAS_DOC:
                ds_rows = tl.load(DS_b + rows, mask=rmask, other=0)
                valid = valid & (offs_n[:, None] >= ds_rows[None, :])
            pT = tl.where(valid, pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - Di[None, :])
        ds_c = dsT.to(qT.dtype)
        dk += _dot(ds_c, tl.trans(qT), IEEE)
        if DQ_ATOMIC:  # dQ rows += dS @ K into an fp32 buffer (relaxed atomics: no fences)
            dq_part = _dot(tl.trans(ds_c), k, IEEE) * sm_scale
            tl.atomic_add(
                DQA_b + h * T * D + rows[:, None] * D + offs_d[None, :], dq_part, mask=rmask[:, None], sem="relaxed"
            )
        # d log_keep_j = sum over far (i, h) of dS_ij: a register reduction, stored once per block
        if MODE == 1:
            dlk += tl.sum(dsT, 1)
        if MODE == 2:
            dlk += tl.sum(tl.where(far, dsT, 0.0), 1)
    return dk, dv, dlk


@_jit
def _dkdv_kernel(
    Q,
    K,
    V,
    LK,
    DS,
    DE,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DLK,
    DQA,
    CNT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    T,
    Hkv,
    window,
    qk_scale,
    sm_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    STAGES: tl.constexpr,
    MASKED_STAGES: tl.constexpr,
    COUNT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N  # the first key blocks see the most query blocks: launched first
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    nmask = offs_n < T

    k = tl.load(
        K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=nmask[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=nmask[:, None],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    bias = (
        tl.load(LK + b64 * stride_lb + hk.to(tl.int64) * stride_lh + offs_n * stride_lt, mask=nmask, other=0.0).to(
            tl.float32
        )
        * 1.4426950408889634
    )

    DS_b = DS + b64 * T
    q_lo, diag1, diag_end, near1, band0, band1, far0, top, doc0, q_hi = _query_ranges(
        DE + b64 * T, n0, T, window, BLOCK_M, BLOCK_N, HAS_DOC
    )
    if COUNT:
        _count(CNT, 3, q_lo, diag1, BLOCK_M, G)
        _count(CNT, 5, diag_end, near1, BLOCK_M, G)
        _count(CNT, 3, band0, band1, BLOCK_M, G)
        _count(CNT, 4, far0, top, BLOCK_M, G)
        if HAS_DOC:
            _count(CNT, 3, doc0, q_hi, BLOCK_M, G)

    Q_b = Q + b64 * stride_qb
    DO_b = DO + b64 * stride_dob
    LSE_b = LSE + b64 * Hkv * G * T
    DELTA_b = DELTA + b64 * Hkv * G * T
    DQA_b = DQA + b64 * Hkv * G * T * D
    h0 = hk * G
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dlk = tl.zeros([BLOCK_N], dtype=tl.float32)
    # (the argument lists differ only in the range and the mode)
    dk, dv, dlk = _dkdv_inner(
        dk,
        dv,
        dlk,
        k,
        v,
        bias,
        Q_b,
        DO_b,
        LSE_b,
        DELTA_b,
        DS_b,
        DQA_b,
        stride_qh,
        stride_qt,
        stride_doh,
        stride_dot,
        h0,
        offs_n,
        offs_m0,
        offs_d,
        q_lo,
        diag1,
        T,
        window,
        qk_scale,
        sm_scale,
        2,
        G,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_M,
        MASKED_STAGES,
        DQ_ATOMIC,
        D,
    )
    dk, dv, dlk = _dkdv_inner(
        dk,
        dv,
        dlk,
        k,
        v,
        bias,
        Q_b,
        DO_b,
        LSE_b,
        DELTA_b,
        DS_b,
        DQA_b,
        stride_qh,
        stride_qt,
        stride_doh,
        stride_dot,
        h0,
        offs_n,
        offs_m0,
        offs_d,
        diag_end,
        near1,
        T,
        window,
        qk_scale,
        sm_scale,
        0,
        G,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_M,
        STAGES,
        DQ_ATOMIC,
        D,
    )
    dk, dv, dlk = _dkdv_inner(
        dk,
        dv,
        dlk,
        k,
        v,
        bias,
        Q_b,
        DO_b,
        LSE_b,
        DELTA_b,
        DS_b,
        DQA_b,
        stride_qh,
        stride_qt,
        stride_doh,
        stride_dot,
        h0,
        offs_n,
        offs_m0,
        offs_d,
        band0,
        band1,
        T,
        window,
        qk_scale,
        sm_scale,
        2,
        G,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_M,
        MASKED_STAGES,
        DQ_ATOMIC,
        D,
    )
    dk, dv, dlk = _dkdv_inner(
        dk,
        dv,
        dlk,
        k,
        v,
        bias,
        Q_b,
        DO_b,
        LSE_b,
        DELTA_b,
        DS_b,
        DQA_b,
        stride_qh,
        stride_qt,
        stride_doh,
        stride_dot,
        h0,
        offs_n,
        offs_m0,
        offs_d,
        far0,
        top,
        T,
        window,
        qk_scale,
        sm_scale,
        1,
        G,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_M,
        STAGES,
        DQ_ATOMIC,
        D,
    )
    if HAS_DOC:
        dk, dv, dlk = _dkdv_inner(
            dk,
            dv,
            dlk,
            k,
            v,
            bias,
            Q_b,
            DO_b,
            LSE_b,
            DELTA_b,
            DS_b,
            DQA_b,
            stride_qh,
            stride_qt,
            stride_doh,
            stride_dot,
            h0,
            offs_n,
            offs_m0,
            offs_d,
            doc0,
            q_hi,
            T,
            window,
            qk_scale,
            sm_scale,
            2,
            G,
            HAS_DOC,
            UPCAST,
            IEEE,
            BLOCK_M,
            MASKED_STAGES,
            DQ_ATOMIC,
            D,
        )

    dk = dk * sm_scale
    tl.store(
        DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=nmask[:, None],
    )
    tl.store(
        DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=nmask[:, None],
    )
    tl.store(DLK + pid_bh.to(tl.int64) * T + offs_n, dlk, mask=nmask)


@_jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    Di,
    k_base,
    v_base,
    lk_base,
    stride_kt,
    stride_vt,
    stride_lt,
    offs_m,
    offs_n,
    offs_d,
    ds_rows,
    lo,
    hi,
    T,
    window,
    qk_scale,
    MODE: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n
        if MODE == 2:
            cmask = cols < T
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cmask[None, :], other=0.0)
            vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None], mask=cmask[None, :], other=0.0)
        else:
            kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None])
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = _dot(q, kT, IEEE) * qk_scale
        if MODE == 1:
            bias = tl.load(lk_base + cols * stride_lt).to(tl.float32) * 1.4426950408889634
            s = s + bias[None, :]
        if MODE == 2:
            bias = tl.load(lk_base + cols * stride_lt, mask=cmask, other=0.0).to(tl.float32) * 1.4426950408889634
            far = _is_far(offs_m[:, None], cols[None, :], window)
            s = s + tl.where(far, bias[None, :], 0.0)
        p = tl.exp2(s - lse[:, None])
        if MODE == 2:
            valid = cols[None, :] <= offs_m[:, None]
            if HAS_DOC:
                valid = valid & (cols[None, :] >= ds_rows[:, None])
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vT, IEEE)
        ds = p * (dp - Di[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
    return dq


@_jit
def _dq_kernel(
    Q,
    K,
    V,
    LK,
    DS,
    DO,
    LSE,
    DELTA,
    DQ,
    CNT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    T,
    Hq,
    window,
    qk_scale,
    sm_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    STAGES: tl.constexpr,
    MASKED_STAGES: tl.constexpr,
    COUNT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rmask = offs_m < T
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=rmask, other=0.0)
    Di = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=rmask, other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    lk_base = LK + b64 * stride_lb + hk.to(tl.int64) * stride_lh
    DS_b = DS + b64 * T
    if HAS_DOC:
        ds_rows = tl.load(DS_b + offs_m, mask=rmask, other=0)
    else:
        ds_rows = offs_m  # unused
    lo, doc_end, s0, far1, band0, band1, near0, diag, hi = _key_ranges(DS_b, m0, T, window, BLOCK_M, BLOCK_N, HAS_DOC)
    if COUNT:
        _count(CNT, 6, lo, doc_end, BLOCK_N, 1)
        _count(CNT, 7, s0, far1, BLOCK_N, 1)
        _count(CNT, 6, band0, band1, BLOCK_N, 1)
        _count(CNT, 8, near0, diag, BLOCK_N, 1)
        _count(CNT, 6, diag, hi, BLOCK_N, 1)

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if HAS_DOC:
        dq = _dq_inner(
            dq,
            q,
            do,
            lse,
            Di,
            k_base,
            v_base,
            lk_base,
            stride_kt,
            stride_vt,
            stride_lt,
            offs_m,
            offs_n,
            offs_d,
            ds_rows,
            lo,
            doc_end,
            T,
            window,
            qk_scale,
            2,
            HAS_DOC,
            UPCAST,
            IEEE,
            BLOCK_N,
            MASKED_STAGES,
        )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        Di,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        s0,
        far1,
        T,
        window,
        qk_scale,
        1,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        Di,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        band0,
        band1,
        T,
        window,
        qk_scale,
        2,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        Di,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        near0,
        diag,
        T,
        window,
        qk_scale,
        0,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        Di,
        k_base,
        v_base,
        lk_base,
        stride_kt,
        stride_vt,
        stride_lt,
        offs_m,
        offs_n,
        offs_d,
        ds_rows,
        diag,
        hi,
        T,
        window,
        qk_scale,
        2,
        HAS_DOC,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )
    dq = dq * sm_scale
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=rmask[:, None],
    )


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


_INTERPRETING = HAS_TRITON and _is_interpreted(_fwd_kernel)


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    return _INTERPRETING


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------
def runs_here(device, head_dim: int) -> bool:
    """THE rule of where the Triton kernels run (training attention, prefill): CUDA, or CPU tensors
    under Triton's interpreter, and a head dim that is a power of two in [16, 256]. attention.py's
    backend choice and the kernels' own fallbacks both ask this."""
    on = torch.device(device).type == "cuda" or interpreting()
    return HAS_TRITON and on and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q, k, v, log_keep):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q (B, Hq, T, D) and k, v (B, Hkv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, length, head dim, "
            f"or query heads not a multiple of KV heads)"
        )
    if tuple(log_keep.shape) != (B, Hkv, T):
        raise ValueError(f"log_keep must be (B, Hkv, T) = {(B, Hkv, T)}, got {tuple(log_keep.shape)}")
    return B, Hq, Hkv, T, D


def _kernel_dtype_ok(q, k, v):
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim {D}: the kernel needs a power of two in [16, 256]")


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _resolve(interpret, wrap, kernels):
    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    is_interp = interpreting()
    if interpret is None:
        interpret = is_interp
    if bool(interpret) != is_interp:
        raise RuntimeError(
            "Triton's CPU interpreter needs TRITON_INTERPRET=1 in the environment before triton is "
            "first imported; CUDA launches need it unset."
        )
    if wrap is not None and not interpret:
        return interpret, [wrap(kern) for kern in kernels]
    return interpret, list(kernels)


def _cfg(cfg, D, dtype):
    base = default_config(D, dtype)
    if cfg:
        base.update(cfg)
    return base


def _launch_fwd(
    q,
    k,
    v,
    log_keep,
    doc_start,
    window: int,
    scale: float,
    *,
    cfg=None,
    wrap=None,
    interpret=None,
    poison=False,
    counts=None,
):
    """Forward kernel -> (out, lse). cfg overrides `default_config` entries; poison fills the
    outputs with NaN first (tests: every element must be written); counts: an int32 (9,) tensor
    receiving the per-class block counts (tests)."""
    B, Hq, Hkv, T, D = _check(q, k, v, log_keep)
    _kernel_dtype_ok(q, k, v)
    interpret, (fwd,) = _resolve(interpret, wrap, (_fwd_kernel,))
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    upcast = bool(interpret and q.dtype == torch.bfloat16)
    ieee = q.dtype == torch.float32 or upcast
    c = _cfg(cfg, D, q.dtype)
    BM, BN, warps, stages = c["fwd"]
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    has_doc = doc_start is not None
    ds = doc_start if has_doc else lse  # unused placeholder
    cnt = counts if counts is not None else lse
    fwd[(B * Hq, _cdiv(T, BM))](
        q,
        k,
        v,
        log_keep,
        ds,
        out,
        lse,
        cnt,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        log_keep.stride(0),
        log_keep.stride(1),
        log_keep.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        T,
        Hq,
        int(window),
        float(scale) * _LOG2E,
        G=Hq // Hkv,
        D=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        HAS_DOC=has_doc,
        UPCAST=upcast,
        IEEE=ieee,
        STAGES=stages,
        MASKED_STAGES=min(stages, c["masked_stages"]),
        COUNT=counts is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def _launch_bwd(
    do,
    q,
    k,
    v,
    log_keep,
    doc_start,
    doc_end,
    out,
    lse,
    window: int,
    scale: float,
    *,
    cfg=None,
    wrap=None,
    interpret=None,
    poison=False,
    counts=None,
):
    """Backward kernels -> (dq, dk, dv, dlog_keep fp32). Keywords as in `_launch_fwd`."""
    B, Hq, Hkv, T, D = _check(q, k, v, log_keep)
    _kernel_dtype_ok(q, k, v)
    interpret, (pre, dkdv, dqk) = _resolve(interpret, wrap, (_bwd_preprocess, _dkdv_kernel, _dq_kernel))
    q, k, v, out, do = (_last_contig(x) for x in (q, k, v, out, do))
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    upcast = bool(interpret and q.dtype == torch.bfloat16)
    ieee = q.dtype == torch.float32 or upcast
    c = _cfg(cfg, D, q.dtype)
    G = Hq // Hkv
    has_doc = doc_start is not None
    dev = q.device

    # dq_atomic: the dK/dV kernel adds dS @ K into an fp32 buffer with relaxed atomics instead of
    # a separate dQ kernel (3 fewer matmul tiles per block pair out of 9, but (BM1 x D) fp32
    # atomics per step and not bitwise deterministic). Off by default; --sweep measures both.
    dq_atomic = bool(c.get("dq_atomic", False))
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=dev)
    dk = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, T, D), dtype=v.dtype, device=dev)
    dlk = torch.empty((B, Hkv, T), dtype=torch.float32, device=dev)
    if dq_atomic:
        dq = dqa = torch.zeros((B, Hq, T, D), dtype=torch.float32, device=dev)
    else:
        dq = torch.empty((B, Hq, T, D), dtype=q.dtype, device=dev)
        dqa = delta  # unused placeholder
    if poison:
        for t in (delta, dk, dv, dlk) + (() if dq_atomic else (dq,)):
            t.fill_(float("nan"))
    ds = doc_start if has_doc else delta
    de = doc_end if has_doc else delta
    cnt = counts if counts is not None else delta

    BMp = 64
    pre[(B * Hq, _cdiv(T, BMp))](
        out,
        do,
        delta,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        T,
        Hq,
        D=D,
        BLOCK_M=BMp,
        num_warps=4,
        num_stages=1,
    )
    BM1, BN1, w1, s1 = c["dkdv"]
    dkdv[(B * Hkv, _cdiv(T, BN1))](
        q,
        k,
        v,
        log_keep,
        ds,
        de,
        do,
        lse,
        delta,
        dk,
        dv,
        dlk,
        dqa,
        cnt,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        log_keep.stride(0),
        log_keep.stride(1),
        log_keep.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        T,
        Hkv,
        int(window),
        float(scale) * _LOG2E,
        float(scale),
        G=G,
        D=D,
        BLOCK_M=BM1,
        BLOCK_N=BN1,
        HAS_DOC=has_doc,
        UPCAST=upcast,
        IEEE=ieee,
        STAGES=s1,
        MASKED_STAGES=min(s1, c["masked_stages"]),
        COUNT=counts is not None,
        DQ_ATOMIC=dq_atomic,
        num_warps=w1,
        num_stages=s1,
    )
    if dq_atomic:
        return dqa.to(q.dtype), dk, dv, dlk
    BM2, BN2, w2, s2 = c["dq"]
    dqk[(B * Hq, _cdiv(T, BM2))](
        q,
        k,
        v,
        log_keep,
        ds,
        do,
        lse,
        delta,
        dq,
        cnt,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        log_keep.stride(0),
        log_keep.stride(1),
        log_keep.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        T,
        Hq,
        int(window),
        float(scale) * _LOG2E,
        float(scale),
        G=G,
        D=D,
        BLOCK_M=BM2,
        BLOCK_N=BN2,
        HAS_DOC=has_doc,
        UPCAST=upcast,
        IEEE=ieee,
        STAGES=s2,
        MASKED_STAGES=min(s2, c["masked_stages"]),
        COUNT=counts is not None,
        num_warps=w2,
        num_stages=s2,
    )
    return dq, dk, dv, dlk


# ----------------------------------------------------------------------------------------------
# Custom ops (CUDA; traceable by torch.compile) + autograd
# ----------------------------------------------------------------------------------------------
_FWD_OP = _BWD_OP = None
if HAS_TRITON and hasattr(torch.library, "triton_op"):

    @torch.library.triton_op("dms_flex::dms_train_attention_fwd", mutates_args=())
    def _fwd_op(
        q: Tensor, k: Tensor, v: Tensor, log_keep: Tensor, doc_start: Optional[Tensor], window: int, scale: float
    ) -> tuple[Tensor, Tensor]:
        return _launch_fwd(q, k, v, log_keep, doc_start, window, scale, wrap=torch.library.wrap_triton, interpret=False)

    @torch.library.triton_op("dms_flex::dms_train_attention_bwd", mutates_args=())
    def _bwd_op(
        do: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_keep: Tensor,
        doc_start: Optional[Tensor],
        doc_end: Optional[Tensor],
        out: Tensor,
        lse: Tensor,
        window: int,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _launch_bwd(
            do,
            q,
            k,
            v,
            log_keep,
            doc_start,
            doc_end,
            out,
            lse,
            window,
            scale,
            wrap=torch.library.wrap_triton,
            interpret=False,
        )

    _FWD_OP = torch.ops.dms_flex.dms_train_attention_fwd
    _BWD_OP = torch.ops.dms_flex.dms_train_attention_bwd


def _use_ops(t: Tensor) -> bool:
    return t.device.type == "cuda" and _FWD_OP is not None and not interpreting()


class DMSTrainAttention(torch.autograd.Function):
    """out = DMS attention(q, k, v, log_keep); gradients for q, k, v and log_keep."""

    @staticmethod
    def forward(ctx, q, k, v, log_keep, doc_start, doc_end, window: int, scale: float):
        if _use_ops(q):
            out, lse = _FWD_OP(q, k, v, log_keep, doc_start, window, scale)
        else:
            out, lse = _launch_fwd(q, k, v, log_keep, doc_start, window, scale)
        ctx.save_for_backward(q, k, v, log_keep, doc_start, doc_end, out, lse)
        ctx.window = window
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_keep, doc_start, doc_end, out, lse = ctx.saved_tensors
        if _use_ops(q):
            dq, dk, dv, dlk = _BWD_OP(do, q, k, v, log_keep, doc_start, doc_end, out, lse, ctx.window, ctx.scale)
        else:
            dq, dk, dv, dlk = _launch_bwd(do, q, k, v, log_keep, doc_start, doc_end, out, lse, ctx.window, ctx.scale)
        return dq, dk, dv, dlk, None, None, None, None


def dms_train_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_keep: Tensor,
    window: int,
    *,
    doc_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """DMS training attention (see the module docstring). q (B, Hq, T, D); k, v (B, Hkv, T, D);
    log_keep (B, Hkv, T) float32 (log(1 - alpha) of the decided token, may require grad);
    doc_ids (B, T) or None. Returns (B, Hq, T, D) in q's dtype.

    Where `runs_here` says yes (CUDA, or CPU tensors under TRITON_INTERPRET=1, and a head dim that is
    a power of two in [16, 256]) the Triton kernels run; otherwise the dense reference
    `dms_flex.kernels.reference.dense_dms_attention` computes the same function."""
    _check(q, k, v, log_keep)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if doc_ids is not None and tuple(doc_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be (B, T) = {(q.shape[0], q.shape[2])}, got {tuple(doc_ids.shape)}")
    if not runs_here(q.device, q.shape[-1]):
        from .reference import dense_dms_attention

        return dense_dms_attention(q, k, v, log_keep, window, doc_ids=doc_ids, scale=scale)
    _kernel_dtype_ok(q, k, v)
    if log_keep.dtype != torch.float32:
        log_keep = log_keep.float()
    doc_start = doc_end = None
    if doc_ids is not None:
        doc_start, doc_end = doc_bounds(doc_ids)
    return DMSTrainAttention.apply(q, k, v, log_keep, doc_start, doc_end, int(window), float(scale))
