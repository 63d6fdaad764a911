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
    W = window + 1
    pos = tl.load(POS + b)
    row = pid.to(tl.int64)
    win_base = WIN + row * W
    sp_base = SP + row * (C + 1)
    sm_base = SM + row * (C + 1)
    evict = tl.load(EV + pid) != 0
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
    # 3. the K/V row
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    slot64 = slot.to(tl.int64)
    k = tl.load(KN + b.to(tl.int64) * stride_knb + h * stride_knh + offs_d, mask=dmask, other=0.0)
    v = tl.load(VN + b.to(tl.int64) * stride_vnb + h * stride_vnh + offs_d, mask=dmask, other=0.0)
    kv_off = (row * (C + 1) + slot64) * D
    _write_row(k, KC + kv_off, KS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)
    _write_row(v, VC + kv_off, VS + row * (C + 1) + slot64, offs_d, dmask, QUANT, ROUND_SCALE)
    # 4. bookkeeping of the new token
    tl.store(sp_base + slot64, pos)
    tl.store(sm_base + slot64, pos < 0)  # False
    tl.store(win_base + ring, slot)


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
