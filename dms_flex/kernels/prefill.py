"""Prefill attention under the DMS hard rule (inference), as one Triton FlashAttention forward.

A prefill chunk of n new tokens (a first prompt, the next chunk of a long prompt, or a later
user turn) attends over two key segments, in one online softmax:

1. the live slots of the compact cache (`dms_flex.cache.DMSKVCache`): slot s of (row b, KV head h)
   holds the token at position `slot_pos[b, h, s]` with its eviction mark `slot_marked[b, h, s]`,
   for s < `length[b, h]`. Slots are not in position order (decode reuses freed slots), so every
   slot block is masked element-wise: slot s is visible to the query at position p iff
   NOT (marked and p - pos > window) (masks.py's rule; a marked slot still in the cache is one
   whose grace window has not run out yet, and it may run out inside the chunk).
   bf16/fp16 slots, or int8 slots with one float32 scale per slot (the int8 cache).
2. the chunk itself, causal in index order, with the chunk's own marks as a per-key bias of
   0 / -inf on far keys: exactly the training kernel's forward (kernels/train_attention.py) with
   hard decisions, reusing its block classes (FAR blocks add a bias vector, NEAR blocks run plain
   attention, only the diagonal and the window band are masked element-wise).

Query i of the chunk is at position pos0[b] + i; chunk keys likewise, so the rule inside the chunk
depends on i - j only. Rows past a batch row's real length (right padding) compute values that the
caller ignores; they never see an empty key set (the diagonal is always visible).

The reference is `dms_flex.kernels.reference.masked_attention` over the visibility mask that
`DMSKVCache.append` builds on the CPU (tests/test_prefill_kernel.py runs both in Triton's
interpreter against float64).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import train_attention as ta

HAS_TRITON = ta.HAS_TRITON
if HAS_TRITON:
    import triton.language as tl
else:  # pragma: no cover
    tl = None

_jit = ta._jit


@_jit
def _cache_inner(
    acc,
    l_i,
    m_i,
    q,
    qpos,
    ck_base,
    cv_base,
    cks_base,
    cvs_base,
    sp_base,
    sm_base,
    length,
    window,
    qk_scale,
    stride_ct,
    stride_st,
    offs_n,
    offs_d,
    QUANT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over the live cache slots [0, length) of one (row, KV head)."""
    for s0 in range(0, length, BLOCK_N):
        cols = s0 + offs_n
        cmask = cols < length
        k = tl.load(ck_base + cols[:, None] * stride_ct + offs_d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(cv_base + cols[:, None] * stride_ct + offs_d[None, :], mask=cmask[:, None], other=0.0)
        if QUANT:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = ta._dot(q, tl.trans(k), IEEE)
        if QUANT:
            qk = qk * tl.load(cks_base + cols * stride_st, mask=cmask, other=0.0).to(tl.float32)[None, :]
        kpos = tl.load(sp_base + cols * stride_st, mask=cmask, other=0)
        marked = tl.load(sm_base + cols * stride_st, mask=cmask, other=0) != 0
        gone = marked[None, :] & ta._is_far(qpos[:, None], kpos[None, :], window)
        s = tl.where(cmask[None, :] & ~gone, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            p = p * tl.load(cvs_base + cols * stride_st, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc = acc * alpha[:, None] + ta._dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _prefill_kernel(
    Q,
    K,
    V,
    LK,
    P0,
    CK,
    CV,
    CKS,
    CVS,
    SP,
    SM,
    CLEN,
    O,
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
    stride_cb,
    stride_ch,
    stride_ct,
    stride_sb,
    stride_sh,
    stride_st,
    stride_ob,
    stride_oh,
    stride_ot,
    T,
    Hq,
    Hkv,
    window,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    QUANT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    STAGES: tl.constexpr,
    MASKED_STAGES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows start first
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    qk_scale = tl.cast(qk_scale, tl.float32)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rmask = offs_m < T
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    q = tl.load(
        Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    if HAS_CACHE:
        qpos = tl.load(P0 + b) + offs_m
        length = tl.load(CLEN + b * Hkv + hk).to(tl.int32)
        c_off = b64 * stride_cb + hk64 * stride_ch
        s_off = b64 * stride_sb + hk64 * stride_sh
        acc, l_i, m_i = _cache_inner(
            acc,
            l_i,
            m_i,
            q,
            qpos,
            CK + c_off,
            CV + c_off,
            CKS + s_off,
            CVS + s_off,
            SP + s_off,
            SM + s_off,
            length,
            window,
            qk_scale,
            stride_ct,
            stride_st,
            offs_n,
            offs_d,
            QUANT,
            UPCAST,
            IEEE,
            BLOCK_N,
        )

    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    lk_base = LK + b64 * stride_lb + hk64 * stride_lh
    # the chunk: the training kernel's block classes without documents (see train_attention.py)
    lo, doc_end, s0, far1, band0, band1, near0, diag, hi = ta._key_ranges(LK, m0, T, window, BLOCK_M, BLOCK_N, False)
    acc, l_i, m_i = ta._fwd_inner(
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
        offs_m,
        s0,
        far1,
        T,
        window,
        qk_scale,
        1,
        False,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    acc, l_i, m_i = ta._fwd_inner(
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
        offs_m,
        band0,
        band1,
        T,
        window,
        qk_scale,
        2,
        False,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )
    acc, l_i, m_i = ta._fwd_inner(
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
        offs_m,
        near0,
        diag,
        T,
        window,
        qk_scale,
        0,
        False,
        UPCAST,
        IEEE,
        BLOCK_N,
        STAGES,
    )
    acc, l_i, m_i = ta._fwd_inner(
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
        offs_m,
        diag,
        hi,
        T,
        window,
        qk_scale,
        2,
        False,
        UPCAST,
        IEEE,
        BLOCK_N,
        MASKED_STAGES,
    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=rmask[:, None],
    )


def supported(q: Tensor) -> bool:
    """Whether the kernel runs for these queries (train_attention.runs_here: the one rule)."""
    return ta.runs_here(q.device, q.shape[-1])


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    marked: Tensor,
    window: int,
    *,
    pos0: Optional[Tensor] = None,
    cache=None,
    scale: Optional[float] = None,
    cfg: Optional[dict] = None,
    poison: bool = False,
) -> Tensor:
    """Hard-rule attention of a chunk of n new tokens over the cache's live slots and themselves.

    q (B, Hq, n, D); k, v (B, Hkv, n, D) post-RoPE, in the model dtype (an int8 cache's new tokens
    already round-tripped through int8, as the cache will hold them); marked (B, Hkv, n) bool: the
    chunk tokens whose successor evicts them; pos0 (B,) position of the chunk's first token;
    cache: a DMSKVCache whose slot marks are already final for this chunk (or None: a first
    prefill). Returns (B, Hq, n, D) in q's dtype.
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, n, D) or v.shape != k.shape or Hq % Hkv or tuple(marked.shape) != (B, Hkv, n):
        raise ValueError(
            f"prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"marked {tuple(marked.shape)} disagree"
        )
    ta._kernel_dtype_ok(q, k, v)
    interpret, (kern,) = ta._resolve(None, None, (_prefill_kernel,))
    q, k, v = ta._last_contig(q), ta._last_contig(k), ta._last_contig(v)
    scale = D**-0.5 if scale is None else float(scale)
    upcast = bool(interpret and q.dtype == torch.bfloat16)
    ieee = q.dtype == torch.float32 or upcast
    c = ta._cfg(cfg, D, q.dtype)
    BM, BN, warps, stages = c["fwd"]
    log_keep = torch.zeros(marked.shape, dtype=torch.float32, device=q.device).masked_fill_(marked, float("-inf"))
    out = torch.empty_like(q)
    if poison:
        out.fill_(float("nan"))
    has_cache = cache is not None and cache.capacity > 0
    quant = bool(has_cache and cache.quantized)
    if has_cache:
        ck, cv, sp, sm, clen = cache.k, cache.v, cache.slot_pos, cache.slot_marked, cache.length
        cks, cvs = (cache.k_scale, cache.v_scale) if quant else (log_keep, log_keep)
        if pos0 is None:
            raise ValueError("prefill_attention over a cache needs pos0, the chunk's first position per row")
        p0 = pos0.to(device=q.device, dtype=torch.int64).contiguous()
        sm = sm.view(torch.uint8) if sm.dtype == torch.bool else sm
        if not quant and ck.dtype != q.dtype:
            raise ValueError(f"cache dtype {ck.dtype} differs from the queries' {q.dtype}")
    else:  # placeholders, never read
        ck = cv = k
        cks = cvs = sp = sm = log_keep
        clen = p0 = log_keep
    kern[(B * Hq, ta._cdiv(n, BM))](
        q,
        k,
        v,
        log_keep,
        p0,
        ck,
        cv,
        cks,
        cvs,
        sp,
        sm,
        clen,
        out,
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
        ck.stride(0),
        ck.stride(1),
        ck.stride(2),
        sp.stride(0),
        sp.stride(1),
        sp.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        n,
        Hq,
        Hkv,
        int(window),
        scale * ta._LOG2E,
        G=Hq // Hkv,
        D=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        HAS_CACHE=has_cache,
        QUANT=quant,
        UPCAST=upcast,
        IEEE=ieee,
        STAGES=stages,
        MASKED_STAGES=min(stages, c["masked_stages"]),
        num_warps=warps,
        num_stages=stages,
    )
    return out
