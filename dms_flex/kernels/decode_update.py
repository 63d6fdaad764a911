"""The decode step's cache write as one Triton kernel: `DMSKVCache.decode_update` fused.

One program per (batch row, KV head) does, for the new token at position p (docs/design.md,
"Decode"):
1. the new token's decision marks its predecessor (position p - 1, found through the ring);
2. the token leaving the window (p - w - 1) frees its slot if it is marked;
3. the new K/V goes into the freed slot, else into slot `length` (slot `capacity`, the scratch
   slot, when the cache is full: the sticky overflow flag is raised and no live token is
   overwritten); for an int8 cache the K/V row is quantized here (symmetric, one scale per row,
   bit-exact to `dms_flex.quant.quantize_kv`);
4. the slot's position, a cleared mark and the ring entry are written.

The reference is the plain-PyTorch `DMSKVCache.decode_update` (cache.py); the unfused path stays
the CPU path and tests/test_prefill_kernel.py checks both give bit-identical cache state.
Static shapes, no host sync: the op (a `torch.library.triton_op`) is traced by torch.compile and
captured in CUDA graphs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import train_attention as ta
from .train_attention import _is_far  # by name: inductor re-emits jit helpers under their own names

HAS_TRITON = ta.HAS_TRITON
if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = tl = None

_jit = ta._jit


@_jit
def _round_half_even(y):
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@_jit
def _write_row(x, base, scale_ptr, offs_d, dmask, QUANT: tl.constexpr, ROUND_SCALE: tl.constexpr):
    """Store one K or V row; int8: scale = max|x| / 127.5 (rounded to the input dtype, as torchao
    computes it there), code = clamp(round_half_even(x * (1 / scale)), -128, 127)."""
    if QUANT:
        xf = x.to(tl.float32)
        amax = tl.max(tl.where(dmask, tl.abs(xf), 0.0), 0)
        scale = tl.maximum(tl.math.div_rn(amax, 127.5), 1e-8)  # quantize_kv's eps
        if ROUND_SCALE:
            scale = scale.to(x.dtype).to(tl.float32)
        inv = tl.math.div_rn(1.0, scale)
        code = tl.minimum(tl.maximum(_round_half_even(xf * inv), -128.0), 127.0)
        tl.store(base + offs_d, code.to(tl.int8), mask=dmask)
        tl.store(scale_ptr, scale)
    else:
        tl.store(base + offs_d, x.to(base.dtype.element_ty), mask=dmask)


@_jit
def _new_token_slot(evict, POS, LEN, SP, SM, WIN, OVF, pid, b, C, window):
    """Steps 1, 2 and 4 of the module docstring for program pid = (row b, KV head), evict the new token's
    decision about its predecessor: returns the slot (int64) the new K/V row goes to and pid as int64 (the
    (row, KV head) index of the cache buffers); the caller writes K/V there."""
    W = window + 1
    pos = tl.load(POS + b)
    row = pid.to(tl.int64)
    win_base = WIN + row * W
    sp_base = SP + row * (C + 1)
    sm_base = SM + row * (C + 1)
    # 1. the predecessor's slot and 2. the slot of the token leaving the window
    prev_slot = tl.load(win_base + (pos + W - 1) % W)
    ring = pos % W
    old_slot = tl.load(win_base + ring)
    old_pos = tl.load(sp_base + old_slot)
    old_mark = tl.load(sm_base + old_slot) != 0
    # with window 0 the leaving token is the predecessor itself: its mark is the one made now
    old_mark = tl.where((pos >= 1) & (old_slot == prev_slot), evict, old_mark)
    freed = (pos >= W) & _is_far(pos, old_pos, window) & old_mark
    length = tl.load(LEN + pid)
    new_slot = tl.where(freed, old_slot, length)
    tl.store(OVF, new_slot >= C, mask=new_slot >= C)
    slot = tl.minimum(new_slot, C)
    tl.store(LEN + pid, tl.minimum(length + tl.where(freed, 0, 1), C))
    # the predecessor's mark (unless its slot is the one being reused right now)
    tl.store(sm_base + prev_slot, evict, mask=(pos >= 1) & (prev_slot != slot))
    slot64 = slot.to(tl.int64)
    # 4. bookkeeping of the new token
    tl.store(sp_base + slot64, pos)
    tl.store(sm_base + slot64, pos < 0)  # False
    tl.store(win_base + ring, slot)
    return slot64, row


@_jit
def _decode_update_kernel(
    KN,
    VN,
    EV,
    POS,
    KC,
    VC,
    KS,
    VS,
    LEN,
    SP,
    SM,
    WIN,
    OVF,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    H,
    C,
    window,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    ROUND_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    slot64, row = _new_token_slot(tl.load(EV + pid) != 0, POS, LEN, SP, SM, WIN, OVF, pid, b, C, window)
    # 3. the K/V row
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k = tl.load(KN + b.to(tl.int64) * stride_knb + h * stride_knh + offs_d, mask=dmask, other=0.0)
    v = tl.load(VN + b.to(tl.int64) * stride_vnb + h * stride_vnh + offs_d, mask=dmask, other=0.0)
    kv_off = (row * (C + 1) + slot64) * D
    _write_row(k, KC + kv_off, KS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)
    _write_row(v, VC + kv_off, VS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)


@_jit
def _rope_row(base, cos, sin, offs_p, HALF: tl.constexpr, ZERO_LAST: tl.constexpr):
    """torchtune's RoPE of one row of D = 2 * D/2 channels in float32: for each pair (x_{2i}, x_{2i+1}),
    (x_{2i} c_i - x_{2i+1} s_i, x_{2i+1} c_i + x_{2i} s_i); ZERO_LAST: channel D-1 set to 0 before and
    after (the borrowed decision channel, decisions.zero_borrowed_channel). Returns (even, odd) halves."""
    x0 = tl.load(base + 2 * offs_p).to(tl.float32)
    x1 = tl.load(base + 2 * offs_p + 1).to(tl.float32)
    if ZERO_LAST:
        x1 = tl.where(offs_p == HALF - 1, 0.0, x1)
    a = x0 * cos
    bb = x1 * sin
    even = a - bb
    c = x1 * cos
    d = x0 * sin
    odd = c + d
    if ZERO_LAST:
        odd = tl.where(offs_p == HALF - 1, 0.0, odd)
    return even, odd


@_jit
def _decode_rope_update_kernel(
    QN,
    KN,
    VN,
    ROPE,
    QOUT,
    EV,
    X,
    AW,
    AG,
    POS,
    KC,
    VC,
    KS,
    VS,
    LEN,
    SP,
    SM,
    WIN,
    OVF,
    stride_qnb,
    stride_qnh,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_rope,
    stride_xb,
    alpha_scale,
    alpha_offset,
    eps,
    H,
    C,
    window,
    G: tl.constexpr,
    D: tl.constexpr,
    QUANT: tl.constexpr,
    ROUND_SCALE: tl.constexpr,
    ZERO_BORROWED: tl.constexpr,
    DECIDE: tl.constexpr,
    LAYER_SCOPE: tl.constexpr,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_G: tl.constexpr,
):
    """`_decode_update_kernel` with the RoPE of the new token's k (before its row is written) and of
    the G query heads of the group (written to QOUT, (B, H*G, D) contiguous) at the row's position, and
    the decision computed here (DECIDE 1, 2) or read from EV (0).

    Exactness: in Triton's interpreter the float32 products and sums round as torch's separate ops do
    (tests/test_prefill_kernel.py checks bit equality there); compiled for a GPU, Triton may contract a
    product and a sum into one FMA, so a rotated value or a decision logit can differ from the eager
    module's in the last float32 bit (the GPU tests compare with tolerances). The adapter branch holds the
    whole hidden vector in one warp's registers (no spill up to hidden 4096; a small one at 8192)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    b64 = b.to(tl.int64)
    offs_p = tl.arange(0, D // 2)
    pos = tl.load(POS + b)
    cos = tl.load(ROPE + pos.to(tl.int64) * stride_rope + 2 * offs_p)
    sin = tl.load(ROPE + pos.to(tl.int64) * stride_rope + 2 * offs_p + 1)
    # the new token's decision about its predecessor (decisions.decide, then hard_evict: logit > 0)
    hd = h * (1 - LAYER_SCOPE)  # per-layer scope: KV head 0's decision for every head
    # float32 as torch computes a float32 tensor with Python scalars (inductor may pass the scalars as fp64)
    a_scale = tl.full([], alpha_scale, tl.float32)
    a_offset = tl.full([], alpha_offset, tl.float32)
    if DECIDE == 1:  # borrowed: the last channel of the group's first query head, before RoPE
        raw = tl.load(QN + b64 * stride_qnb + hd * G * stride_qnh + D - 1).to(tl.float32)
        evict = (raw * a_scale - a_offset) > 0.0
    elif DECIDE == 2:  # adapter, one-token form: rsqrt(mean(x^2) + eps) * (x . (w_h * g))
        offs_x = tl.arange(0, BLOCK_H)
        xm = offs_x < HIDDEN
        xf = tl.load(X + b64 * stride_xb + offs_x, mask=xm, other=0.0).to(tl.float32)
        w = tl.load(AW + hd * HIDDEN + offs_x, mask=xm, other=0.0)
        if HAS_G:
            w = w * tl.load(AG + offs_x, mask=xm, other=0.0)
        dot = tl.sum(xf * w, 0)
        ms = tl.sum(xf * xf, 0) / HIDDEN
        evict = (dot * (1.0 / tl.sqrt_rn(ms + tl.full([], eps, tl.float32))) * a_scale - a_offset) > 0.0
    else:
        evict = tl.load(EV + pid) != 0
    slot64, row = _new_token_slot(evict, POS, LEN, SP, SM, WIN, OVF, pid, b, C, window)
    ke, ko = _rope_row(KN + b64 * stride_knb + h * stride_knh, cos, sin, offs_p, D // 2, False)
    k = tl.reshape(tl.join(ke, ko), [D]).to(KN.dtype.element_ty)  # as torchtune: type_as the input
    offs_d = tl.arange(0, D)
    dmask = offs_d < D
    v = tl.load(VN + b64 * stride_vnb + h * stride_vnh + offs_d)
    kv_off = (row * (C + 1) + slot64) * D
    _write_row(k, KC + kv_off, KS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)
    _write_row(v, VC + kv_off, VS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)
    for g in tl.static_range(G):
        hq = h * G + g
        qe, qo = _rope_row(QN + b64 * stride_qnb + hq * stride_qnh, cos, sin, offs_p, D // 2, ZERO_BORROWED and g == 0)
        q = tl.reshape(tl.join(qe, qo), [D]).to(QOUT.dtype.element_ty)
        tl.store(QOUT + (b64 * H * G + hq) * D + offs_d, q)


def _launch(
    k_new,
    v_new,
    evict,
    pos,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    length,
    slot_pos,
    slot_marked,
    win_slot,
    overflow,
    window: int,
    wrap=None,
):
    B, H, C1, D = k_cache.shape
    interpret, (kern,) = ta._resolve(None, wrap, (_decode_update_kernel,))
    quant = k_scale is not None
    ks = k_scale if quant else length
    vs = v_scale if quant else length
    kern[(B * H,)](
        k_new,
        v_new,
        evict,
        pos,
        k_cache,
        v_cache,
        ks,
        vs,
        length,
        slot_pos,
        slot_marked,
        win_slot,
        overflow,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        H,
        C1 - 1,
        int(window),
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        QUANT=quant,
        ROUND_SCALE=quant and k_new.dtype != torch.float32,
        num_warps=1,
    )


_OP = _OP_INT8 = None
if HAS_TRITON and hasattr(torch.library, "triton_op"):
    _MUT = ("k_cache", "v_cache", "length", "slot_pos", "slot_marked", "win_slot", "overflow")

    @torch.library.triton_op("dms_flex::decode_update", mutates_args=_MUT)
    def _op(
        k_new: Tensor,
        v_new: Tensor,
        evict: Tensor,
        pos: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        length: Tensor,
        slot_pos: Tensor,
        slot_marked: Tensor,
        win_slot: Tensor,
        overflow: Tensor,
        window: int,
    ) -> None:
        _launch(
            k_new,
            v_new,
            evict,
            pos,
            k_cache,
            v_cache,
            None,
            None,
            length,
            slot_pos,
            slot_marked,
            win_slot,
            overflow,
            window,
            wrap=torch.library.wrap_triton,
        )

    @torch.library.triton_op("dms_flex::decode_update_int8", mutates_args=_MUT + ("k_scale", "v_scale"))
    def _op_int8(
        k_new: Tensor,
        v_new: Tensor,
        evict: Tensor,
        pos: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        k_scale: Tensor,
        v_scale: Tensor,
        length: Tensor,
        slot_pos: Tensor,
        slot_marked: Tensor,
        win_slot: Tensor,
        overflow: Tensor,
        window: int,
    ) -> None:
        _launch(
            k_new,
            v_new,
            evict,
            pos,
            k_cache,
            v_cache,
            k_scale,
            v_scale,
            length,
            slot_pos,
            slot_marked,
            win_slot,
            overflow,
            window,
            wrap=torch.library.wrap_triton,
        )

    _OP = torch.ops.dms_flex.decode_update
    _OP_INT8 = torch.ops.dms_flex.decode_update_int8


class Decision:
    """Where `decode_rope_update` takes the new token's decision from. kind "input": the evict tensor;
    "borrowed": q's borrowed channel; "adapter": the adapter's one-token form over x, the layer's input
    (B, hidden), with weight (Hkv, hidden) float32 and the norm's scale g (hidden,) float32 or None.
    alpha_scale, alpha_offset: the DMS config's; layer_scope: KV head 0's decision for all heads; eps: the
    adapter norm's eps (the default is DMSAdapter's). The adapter form is `DMSAdapter.one_token` also where
    an eager step would run the norm + linear form: the two differ by summation order, so a decision can
    differ only for a logit within rounding of 0."""

    KINDS = {"input": 0, "borrowed": 1, "adapter": 2}

    def __init__(
        self, kind="input", alpha_scale=1.0, alpha_offset=0.0, layer_scope=False, x=None, weight=None, g=None, eps=1e-6
    ):
        if kind not in self.KINDS:
            raise ValueError(f"decision kind {kind!r}: expected one of {sorted(self.KINDS)}")
        self.kind, self.alpha_scale, self.alpha_offset, self.layer_scope = kind, alpha_scale, alpha_offset, layer_scope
        self.x, self.weight, self.g, self.eps = x, weight, g, eps


def _launch_rope(q_new, k_new, v_new, rope, evict, pos, cache, zero_borrowed: bool, decision=None, wrap=None) -> Tensor:
    """q_new (B, Hq, D), k_new, v_new (B, H, D) before RoPE (last dims contiguous); rope (max_seq, D/2, 2)
    float32 (cos, sin) per position and pair; decision: a `Decision` (None: the evict tensor). Returns q
    after RoPE, (B, Hq, D) contiguous."""
    decision = decision or Decision()
    B, H, C1, D = cache.k.shape
    Hq = q_new.shape[1]
    q_out = torch.empty((B, Hq, D), dtype=q_new.dtype, device=q_new.device)
    interpret, (kern,) = ta._resolve(None, wrap, (_decode_rope_update_kernel,))
    quant = cache.k_scale is not None
    ks = cache.k_scale if quant else cache.length
    vs = cache.v_scale if quant else cache.length
    x, w, g = decision.x, decision.weight, decision.g
    hidden = x.shape[-1] if x is not None else 1
    kern[(B * H,)](
        q_new,
        k_new,
        v_new,
        rope,
        q_out,
        evict,
        x if x is not None else evict,
        w if w is not None else q_out,
        g if g is not None else q_out,
        pos,
        cache.k,
        cache.v,
        ks,
        vs,
        cache.length,
        cache.slot_pos,
        cache.slot_marked,
        cache.win_slot,
        cache.overflow,
        q_new.stride(0),
        q_new.stride(1),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        rope.stride(0),
        x.stride(0) if x is not None else 0,
        float(decision.alpha_scale),
        float(decision.alpha_offset),
        float(decision.eps),
        H,
        C1 - 1,
        int(cache.window),
        G=Hq // H,
        D=D,
        QUANT=quant,
        ROUND_SCALE=quant and k_new.dtype != torch.float32,
        ZERO_BORROWED=bool(zero_borrowed),
        DECIDE=Decision.KINDS[decision.kind],
        LAYER_SCOPE=int(bool(decision.layer_scope)),
        HIDDEN=hidden,
        BLOCK_H=triton.next_power_of_2(hidden),
        HAS_G=g is not None,
        num_warps=1,
    )
    return q_out


class _CacheArgs:
    """The cache tensors by name, as `_launch_rope` reads them (the ops below get them one by one)."""

    def __init__(self, k, v, k_scale, v_scale, length, slot_pos, slot_marked, win_slot, overflow, window):
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale
        self.length, self.slot_pos, self.slot_marked, self.win_slot = length, slot_pos, slot_marked, win_slot
        self.overflow, self.window = overflow, window


_ROPE_OP = _ROPE_OP_INT8 = None
if HAS_TRITON and hasattr(torch.library, "triton_op"):

    def _decision_of(decide, x, adapter_w, adapter_g, alpha_scale, alpha_offset, eps, layer_scope):
        kind = {v: k for k, v in Decision.KINDS.items()}[decide]
        return Decision(kind, alpha_scale, alpha_offset, layer_scope, x, adapter_w, adapter_g, eps)

    @torch.library.triton_op("dms_flex::decode_rope_update", mutates_args=_MUT)
    def _rope_op(
        q_new: Tensor,
        k_new: Tensor,
        v_new: Tensor,
        rope: Tensor,
        evict: Tensor,
        pos: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        length: Tensor,
        slot_pos: Tensor,
        slot_marked: Tensor,
        win_slot: Tensor,
        overflow: Tensor,
        window: int,
        zero_borrowed: bool,
        decide: int,
        x: Optional[Tensor],
        adapter_w: Optional[Tensor],
        adapter_g: Optional[Tensor],
        alpha_scale: float,
        alpha_offset: float,
        eps: float,
        layer_scope: bool,
    ) -> Tensor:
        c = _CacheArgs(k_cache, v_cache, None, None, length, slot_pos, slot_marked, win_slot, overflow, window)
        d = _decision_of(decide, x, adapter_w, adapter_g, alpha_scale, alpha_offset, eps, layer_scope)
        return _launch_rope(q_new, k_new, v_new, rope, evict, pos, c, zero_borrowed, d, wrap=torch.library.wrap_triton)

    @torch.library.triton_op("dms_flex::decode_rope_update_int8", mutates_args=_MUT + ("k_scale", "v_scale"))
    def _rope_op_int8(
        q_new: Tensor,
        k_new: Tensor,
        v_new: Tensor,
        rope: Tensor,
        evict: Tensor,
        pos: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        k_scale: Tensor,
        v_scale: Tensor,
        length: Tensor,
        slot_pos: Tensor,
        slot_marked: Tensor,
        win_slot: Tensor,
        overflow: Tensor,
        window: int,
        zero_borrowed: bool,
        decide: int,
        x: Optional[Tensor],
        adapter_w: Optional[Tensor],
        adapter_g: Optional[Tensor],
        alpha_scale: float,
        alpha_offset: float,
        eps: float,
        layer_scope: bool,
    ) -> Tensor:
        c = _CacheArgs(k_cache, v_cache, k_scale, v_scale, length, slot_pos, slot_marked, win_slot, overflow, window)
        d = _decision_of(decide, x, adapter_w, adapter_g, alpha_scale, alpha_offset, eps, layer_scope)
        return _launch_rope(q_new, k_new, v_new, rope, evict, pos, c, zero_borrowed, d, wrap=torch.library.wrap_triton)

    _ROPE_OP = torch.ops.dms_flex.decode_rope_update
    _ROPE_OP_INT8 = torch.ops.dms_flex.decode_rope_update_int8


def rope_table_fits(head_dim: int, rope_table, positions: int) -> bool:
    """Whether `decode_rope_update` can rotate with `rope_table`: a (max_seq, D/2, 2) float32 table of
    torchtune's interleaved RoPE (a model cast to bf16 has a bf16 table: the separate path then), covering
    `positions` positions, and a power-of-two head dim D >= 16."""
    D = int(head_dim)
    return (
        rope_table is not None
        and rope_table.dim() == 3
        and tuple(rope_table.shape[1:]) == (D // 2, 2)
        and rope_table.shape[0] >= positions
        and rope_table.dtype == torch.float32
        and rope_table.stride(-1) == 1
        and rope_table.stride(-2) == 2
        and D >= 16
        and D & (D - 1) == 0
    )


def rope_supported(q_new: Tensor, rope_table) -> bool:
    """Where `decode_rope_update` runs: the fused kernel's device (CUDA, or CPU under the interpreter) and a
    table `rope_table_fits` takes."""
    return supported(q_new) and rope_table_fits(q_new.shape[-1], rope_table, 0)


def _check_rope_inputs(cache, q_new, k_new, v_new, rope, pos, decision) -> None:
    """Shapes and dtypes `decode_rope_update` relies on (host-side, static: no sync)."""
    B, H, _, D = cache.k.shape
    if tuple(k_new.shape) != (B, H, D) or tuple(v_new.shape) != (B, H, D):
        raise ValueError(f"k_new, v_new must be (B, H, 1, D) = ({B}, {H}, 1, {D}), got {tuple(k_new.shape)}")
    if q_new.dim() != 3 or q_new.shape[0] != B or q_new.shape[2] != D or q_new.shape[1] % H:
        raise ValueError(f"q_new must be (B, Hq, 1, D) with Hq a multiple of H={H}, got {tuple(q_new.shape)}")
    if not rope_table_fits(D, rope, 0):
        raise ValueError("rope must be a (max_seq, D/2, 2) float32 table (torchtune's RoPE cache); see rope_table_fits")
    if tuple(pos.shape) != (B,):
        raise ValueError(f"pos must be (B,) = ({B},), got {tuple(pos.shape)}")
    if decision.kind == "adapter":
        x, w, g = decision.x, decision.weight, decision.g
        if x is None or w is None:
            raise ValueError("an adapter Decision needs x (the layer's input) and the adapter's weight")
        n = x.shape[-1]
        if w.dtype != torch.float32 or tuple(w.shape) != (H, n) or not w.is_contiguous():
            raise ValueError(f"the adapter weight must be a contiguous float32 ({H}, {n}), got {tuple(w.shape)}")
        if g is not None and (g.dtype != torch.float32 or tuple(g.shape) != (n,) or not g.is_contiguous()):
            raise ValueError(f"the adapter's norm weight must be a contiguous float32 ({n},)")


def decode_rope_update(
    cache,
    q_new: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    rope: Tensor,
    evict_prev: Optional[Tensor],
    pos: Tensor,
    zero_borrowed: bool,
    decision: Optional[Decision] = None,
) -> Tensor:
    """RoPE of the new token's q and k at `pos` and `DMSKVCache.decode_update` in one kernel: q_new
    (B, Hq, 1, D), k_new, v_new (B, H, 1, D) before RoPE (any strides with a contiguous last dim), rope
    (max_seq, D/2, 2) the rotary module's (cos, sin) table, pos (B,) int64; evict_prev (B, H) bool, the
    decisions, or None with a `Decision` that the kernel computes them from; zero_borrowed: channel D-1 of
    each group's first query head is zeroed before and after RoPE (the borrowed decision channel).
    Returns q after RoPE (B, Hq, 1, D). See `rope_supported`."""
    decision = decision or Decision()
    if decision.kind == "input" and evict_prev is None:
        raise ValueError("decode_rope_update needs evict_prev, or a Decision that computes it")
    q_new, k_new, v_new = q_new[:, :, 0], k_new[:, :, 0], v_new[:, :, 0]
    _check_rope_inputs(cache, q_new, k_new, v_new, rope, pos, decision)
    if q_new.stride(-1) != 1:
        q_new = q_new.contiguous()
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    x = decision.x
    if x is not None:
        x = x.reshape(x.shape[0], x.shape[-1])  # (B, 1, hidden) -> (B, hidden)
        if x.stride(-1) != 1:
            x = x.contiguous()
        decision = Decision(
            decision.kind,
            decision.alpha_scale,
            decision.alpha_offset,
            decision.layer_scope,
            x,
            decision.weight,
            decision.g,
            decision.eps,
        )
    evict = evict_prev.contiguous() if evict_prev is not None else pos
    if q_new.device.type == "cuda" and _ROPE_OP is not None and not ta.interpreting():
        args = (cache.length, cache.slot_pos, cache.slot_marked, cache.win_slot, cache.overflow, cache.window)
        d = decision
        dargs = (
            bool(zero_borrowed),
            Decision.KINDS[d.kind],
            d.x,
            d.weight,
            d.g,
            float(d.alpha_scale),
            float(d.alpha_offset),
            float(d.eps),
            bool(d.layer_scope),
        )
        if cache.quantized:
            q = _ROPE_OP_INT8(
                q_new, k_new, v_new, rope, evict, pos, cache.k, cache.v, cache.k_scale, cache.v_scale, *args, *dargs
            )
        else:
            q = _ROPE_OP(q_new, k_new, v_new, rope, evict, pos, cache.k, cache.v, *args, *dargs)
    else:
        q = _launch_rope(q_new, k_new, v_new, rope, evict, pos, cache, zero_borrowed, decision)
    return q[:, :, None]


def supported(k_new: Tensor) -> bool:
    return HAS_TRITON and (k_new.device.type == "cuda" or ta.interpreting())


def decode_update(cache, k_new: Tensor, v_new: Tensor, evict_prev: Tensor, pos: Tensor) -> None:
    """Fused `DMSKVCache.decode_update`: k_new, v_new (B, H, 1, D) (any strides with a contiguous
    last dim), evict_prev (B, H) bool, pos (B,) int64."""
    k_new, v_new = k_new[:, :, 0], v_new[:, :, 0]
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    evict_prev = evict_prev.contiguous()
    args = (cache.k, cache.v, cache.length, cache.slot_pos, cache.slot_marked, cache.win_slot, cache.overflow)
    if k_new.device.type == "cuda" and _OP is not None and not ta.interpreting():
        if cache.quantized:
            _OP_INT8(
                k_new, v_new, evict_prev, pos, cache.k, cache.v, cache.k_scale, cache.v_scale, *args[2:], cache.window
            )
        else:
            _OP(k_new, v_new, evict_prev, pos, *args, cache.window)
        return
    _launch(k_new, v_new, evict_prev, pos, cache.k, cache.v, cache.k_scale, cache.v_scale, *args[2:], cache.window)
