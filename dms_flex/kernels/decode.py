"""Decode attention over DMS's compact KV cache (split-KV "flash-decoding" in Triton).

Shapes
------
q:         (B, Hq, D)      one query token per batch row
k_cache:   (B, Hkv, C, D)  C = slot capacity; last dim contiguous
v_cache:   (B, Hkv, C, D)
lengths:   (B, Hkv)        int32/int64, live slots per (row, kv head); slots [0, lengths[b, h])
                           are live, slots past it are ignored (they may hold garbage, NaN/inf).
                           Values are clamped to [0, C].
Hq = Hkv * G (grouped-query attention: query heads h*G .. h*G+G-1 read kv head h).
Output: (B, Hq, D) in q's dtype. A (row, kv head) with length 0 attends to nothing: its G query
heads output zeros (defined so; a softmax over an empty set has no value).

Optional int8 cache: k_cache/v_cache int8 with per-token float scales k_scale/v_scale of shape
(B, Hkv, C): the dequantized cache is k_cache.float() * k_scale[..., None] (same for v).

GPU design
----------
Stage 1 (``_decode_split_kernel``), grid (B*Hkv, num_splits): a program owns one kv head of one
row and one contiguous split of ``split_size`` slots. It loads the G query heads of its group as
the rows of a (BLOCK_G, BLOCK_D) tile (BLOCK_G = max(16, next_pow2(G)), rows >= G zero) so every K
and V byte is read from memory once for the whole group and both products run on the tensor cores:
S = Q K^T (BLOCK_G x BLOCK_N), online softmax in fp32 (exp2, running max/sum), acc += P V.
It walks [split_start, min(split_end, length)) in BLOCK_N steps; a program whose split starts at
or past the length runs zero iterations and stores nothing. It writes the normalized partial
output (fp32) and its log-sum-exp (log2 units) to a workspace.
Stage 2 (``_decode_merge_kernel``), grid (B*Hq,): merges the active splits of each query head
(split index < cdiv(length, split_size)) with log-sum-exp weights; no active split -> zeros.
When a shape needs one split only, stage 1 writes the final output directly (no stage 2).

Why tl.dot with G padded to 16 rows rather than a broadcast multiply-reduce: decode is
memory-bound, and the padded MMA costs 2*16 flops per K/V element, far under the tensor cores'
rate; it keeps K/V tiles in shared memory (cp.async pipeline, num_stages deep) at 86-102
registers per thread. A CUDA-core multiply-reduce needs the tiles in registers and 2*G FMAs per
element plus cross-lane reductions, which at G=8 approaches the FMA rate needed to stream at
~4.5 TB/s. (bench --aot prints registers / shared memory / instruction counts.)

Block sizes (``_config``): BLOCK_N = 16 KB / (D * element size) capped to [16, 128] (bf16 D=128:
64, D=64: 128), BLOCK_G = max(16, next_pow2(G)), BLOCK_D = next_pow2(D), 4 warps, 3 stages.
Split heuristic (``choose_split``, with the block settings in ``launch_settings``): long streams first,
for short caches. Where C // 4,096 splits (int8: C // 2,048; at least one, so a shorter cache streams
whole), if that is one or two, fill the GPU (B*Hkv*num_splits >= 0.9*SMs), that is the split: a compact
cache of ~4,096 slots at B=16 x 8 KV heads runs one program per (row, KV head), with no merge launch.
Otherwise at least 8 programs per SM (B*Hkv*num_splits >= 8*SMs) with splits >= 256 slots (a long dense
cache streams fastest with several programs per SM: 8 splits of 4,096 slots were 1.8% slower than this
rule's 9 at B=16 x 32K). Splits are a whole number of BLOCK_N blocks; from Python ints only. Where the
long streams leave about one program per SM, one program per (row, KV head) (bf16, fp16, fp32) takes
twice the rule's tile, at most 128 slots, with 3 stages: one program per SM needs the bytes in flight;
int8 at two programs per SM takes 3 stages. Measured at Llama-3-8B heads, B=16, 4,096 live slots
(benchmarks/RESULTS.md, section 28): one split of 128-slot tiles 65.2 us (0.97x copy) against 72.9 us
for 9 splits of 64 and the merge; int8, 2 splits with 3 stages 55.5 us against 58.1 us for 9 splits
with 2.

int8 K/V are converted to q's dtype for the tensor-core dots; the ``f16`` launch option (off by default)
instead runs fp16 dots on the codes, converted by one of `F16_CVTS`. None is faster: the int8 kernel reads at
~0.59x the copy rate whichever way the codes are converted, bound by the byte-wise move of V's codes into the
dot's operand layout (benchmarks/RESULTS.md, sections 28e and 29).

num_splits is a function of shapes only (B, Hkv, C and the SM count): no host syncs, no
data-dependent Python control flow, so the op can be captured in CUDA graphs and traced by
torch.compile(fullgraph=True) (it is a ``torch.library.triton_op``).
"""

from __future__ import annotations

import functools
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

from .reference import check_decode_shapes, decode_attention_reference  # noqa: E402,F401

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "choose_split",
    "HAS_TRITON",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Target number of stage-1 programs per SM: many small programs keep the memory system busy and
# shrink the tail of the last wave. Minimum slots per split keeps per-program overhead small.
_PROGRAMS_PER_SM = 8
_MIN_SPLIT = 256
# Slots a program streams before another split pays for itself, when such programs fill the GPU
# (see the module docstring); int8 tiles are converted in registers, so two programs per SM help.
_LONG_STREAM = 4096
_LONG_STREAM_INT8 = 2048
_FILLED = 0.9  # programs per SM that count as a filled grid
_DEFAULT_SM_COUNT = 132  # H100/H200 SXM

# Benchmarks only (`benchmarks/bench_decode_step.py --decode-config`): launch settings that replace the
# shape rule's in every launch that does not pass its own, read when a compiled step is traced. Keys:
# block_n, num_warps, num_stages, num_splits, f16 (int8: fp16 dots on the codes). Empty in normal use.
_LAUNCH_OVERRIDE: dict = {}


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return int(torch.cuda.get_device_properties(device_index).multi_processor_count)
    except Exception:  # pragma: no cover
        return _DEFAULT_SM_COUNT


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_splits(B: int, Hkv: int, C: int, sm_count: int, quant: bool) -> tuple[int, bool]:
    """(number of splits, whether they are long streams that fill the GPU): see `choose_split`."""
    C = max(int(C), 1)
    bh = max(int(B) * int(Hkv), 1)
    long_splits = max(1, C // (_LONG_STREAM_INT8 if quant else _LONG_STREAM))
    if long_splits <= 2 and bh * long_splits >= _FILLED * sm_count:
        return long_splits, True
    want = _cdiv(_PROGRAMS_PER_SM * sm_count, bh)
    return max(1, min(want, _cdiv(C, _MIN_SPLIT))), False


def _split_size(C: int, splits: int, block_n: int) -> int:
    """Slots per split for `splits` splits of C slots: a whole number of BLOCK_N blocks."""
    return _cdiv(_cdiv(max(int(C), 1), max(int(splits), 1)), block_n) * block_n


def choose_split(
    B: int, Hkv: int, C: int, block_n: int, sm_count: int = _DEFAULT_SM_COUNT, quant: bool = False
) -> tuple[int, int]:
    """Return (split_size, num_splits) from shapes only.

    Long streams, for short caches: where one or two programs per (row, KV head) fill the GPU
    (B*Hkv*num_splits >= 0.9*SMs) with C // ``_LONG_STREAM`` (int8: ``_LONG_STREAM_INT8``) splits, at least
    one (so a cache shorter than that streams whole), that is the split. Otherwise at least
    ``_PROGRAMS_PER_SM * sm_count`` programs with splits of at least ``_MIN_SPLIT`` slots. Splits are a whole
    number of BLOCK_N blocks.
    """
    splits, _ = _num_splits(B, Hkv, C, sm_count, quant)
    split_size = _split_size(C, splits, block_n)
    return split_size, _cdiv(max(int(C), 1), split_size)


def _long_stream_config(cfg: dict, splits: int, quant: bool, programs: int, sm_count: int) -> dict:
    """Block sizes for the long streams of `choose_split` where each SM holds about one program (bf16/fp16/
    fp32, one split: twice the rule's tile, at most 128 slots, with 3 stages, the bytes in flight of one
    program per SM) or two (int8 at one or two splits: 3 stages). Otherwise (more programs per SM, which
    the smaller tiles let share an SM) cfg unchanged."""
    if quant and splits <= 2 and programs <= 2 * sm_count:
        return dict(cfg, num_stages=3)
    if not quant and splits == 1 and programs <= sm_count:
        return dict(cfg, BLOCK_N=min(128, 2 * cfg["BLOCK_N"]), num_stages=3)
    return cfg


def launch_settings(
    B: int,
    Hkv: int,
    C: int,
    D: int,
    G: int,
    elem_bytes: int,
    quant: bool,
    sm_count: int = _DEFAULT_SM_COUNT,
    *,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    split_size: Optional[int] = None,
    num_splits: Optional[int] = None,
) -> tuple[dict, int, int]:
    """(block config, split_size, num_splits) of a launch, from Python ints only: `_launch_config`, the split
    of `choose_split` (or `num_splits` / `split_size` given) and, for its long streams, `_long_stream_config`
    unless block settings are given (explicit settings win, and replace only what they name)."""
    cfg = _launch_config(D, G, elem_bytes, quant)
    given = split_size is not None and split_size > 0
    if not given:
        if num_splits:
            n, long = int(num_splits), False
        else:
            n, long = _num_splits(B, Hkv, C, sm_count, quant)
        if long and block_n is None and num_stages is None:
            cfg = _long_stream_config(cfg, n, quant, max(B * Hkv, 1) * n, sm_count)
    for key, value in (("BLOCK_N", block_n), ("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None:
            cfg[key] = int(value)
    split_size = int(split_size) if given else _split_size(C, n, cfg["BLOCK_N"])
    splits = _cdiv(C, split_size)
    if splits > 65535:  # CUDA grid y limit
        split_size = _split_size(C, 65535, cfg["BLOCK_N"])
        splits = _cdiv(C, split_size)
    return cfg, split_size, splits


def _config(D: int, G: int, elem_bytes: int):
    """Block sizes: BLOCK_N such that a K (or V) tile is ~16 KB in the compute dtype
    (bf16/fp16 D=128: 64, D=64: 128; fp32 D=128: 32). 4 warps, 3 stages: offline sm_90 compile
    (bench --aot) gives 86-102 registers, no spills, ~70 KB shared memory (3 programs per SM)."""
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16; extra channels are masked
    block_g = max(16, triton.next_power_of_2(G))
    tile_elems = 16384 // max(elem_bytes, 1)
    block_n = max(16, min(128, tile_elems // block_d))
    return dict(BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=4, num_stages=3)


def _launch_config(D: int, G: int, elem_bytes: int, quant: bool):
    """The launch's block sizes: `_config` in the dtype the tiles are computed in (an int8 tile is
    converted to q's dtype: elem_bytes = q's element size). int8 K/V: twice the slots of that tile, at most
    128, and 2 stages (at D=128 and a bf16 q: 128 slots, the int8 bytes in flight of the bf16 rule's tile of
    64; 2 stages of the 3 the converted tiles' registers leave room for): 58.2 vs 65.2 us at Llama-3-8B heads, B=16, 4,096 live slots, and 11.7 vs 12.1 us at
    SmolLM2's (benchmarks/RESULTS.md, section 27)."""
    cfg = _config(D, G, elem_bytes)
    if quant:  # twice the slots of the bf16 rule's tile, at most 128: the int8 bytes in flight of a bf16 tile
        cfg.update(BLOCK_N=min(128, 2 * cfg["BLOCK_N"]), num_stages=2)
    return cfg


# ----------------------------------------------------------------------------------------------
# Triton kernels (plain functions; decorated below, or run by the interpreter on request)
# ----------------------------------------------------------------------------------------------
# int8 codes -> fp16 exactly, by the mantissa: the byte plus 128 (its top bit flipped) becomes the low mantissa
# byte of 1024.0 (fp16 bits 0x64xx, the value 1152 + code), and 1152.0 (0x6480) is subtracted, unless CVT 4
# leaves it on the tile (the kernel subtracts 1152 times the other operand's sum after the dot). A cvt per code
# is a low-throughput conversion. CVT (the `F16_CVTS` names): 1 "asm" does it in inline PTX, 5 instructions
# per 4 codes, impure (Triton does not move it past the tile's move into the dot's operand layout); 2
# "asm_pure" the same PTX, pure; 3 "arith" / 4 "arith_fold" the same bits in plain Triton integer ops; 0 a
# plain conversion (test_decode_kernel.py checks the arithmetic; RESULTS.md sections 28e and 29 measure
# them). The function is defined under the name the kernel calls: inductor re-emits a user kernel's helpers
# from their source.
def _i8_to_f16(x, CVT: tl.constexpr):
    if CVT == 1 or CVT == 2:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, m; xor.b32 t, $2, 0x80808080; prmt.b32 $0, t, 0x64646464, 0x4140; "
            "prmt.b32 $1, t, 0x64646464, 0x4342; mov.b32 m, 0x64806480; sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m;}",
            "=r,=r,r",
            [x],
            dtype=tl.float16,
            is_pure=CVT == 2,
            pack=4,
        )
    elif CVT >= 3:
        u = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint8)
        f = (u.to(tl.uint16) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        if CVT == 3:
            f = f - 1152.0
        return f
    else:
        return x.to(tl.float16)


# the `f16` launch option's conversions (`_i8_to_f16`'s CVT); f16=True takes F16_DEFAULT_CVT
F16_CVTS = {"cvt": 0, "asm": 1, "asm_pure": 2, "arith": 3, "arith_fold": 4}
F16_DEFAULT_CVT = "asm_pure"  # the fastest of the five at 8B and SmolLM2 heads (RESULTS.md section 29)


def _f16_cvt(f16, interpret: bool) -> int:
    """The kernel's F16_CVT for a launch's ``f16`` (False/None: no fp16 dots, 0 unused; True: the default
    conversion; or a name of F16_CVTS). The interpreter cannot run PTX: the asm ones convert plainly there."""
    if f16 is None or f16 is False:
        return 0
    name = F16_DEFAULT_CVT if f16 is True else f16
    if name not in F16_CVTS:
        raise ValueError(f"f16 must be a bool or one of {sorted(F16_CVTS)}, got {f16!r}")
    cvt = F16_CVTS[name]
    return 0 if interpret and cvt in (1, 2) else cvt


_i8_to_f16_fn = _i8_to_f16  # the plain function (decorated below, or run by the interpreter)


def _decode_split_kernel_fn(
    Q,
    K,
    V,
    KS,
    VS,
    LEN,
    O_PART,
    LSE_PART,
    OUT,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ksb,
    stride_ksh,
    stride_ksn,
    stride_vsb,
    stride_vsh,
    stride_vsn,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    Hkv,
    C,
    split_size,
    num_splits,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
    QUANT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    F16: tl.constexpr = False,
    F16_CVT: tl.constexpr = 0,
):
    """F16 (int8 only): fp16 dots on the int8 codes (exact in fp16), with q / max|q| (per query head) and
    p * v_scale / (the split's largest v_scale) rounded to fp16, the two maxima multiplied back in float32;
    F16_CVT: how `_i8_to_f16` converts the codes (the PTX ones not in the interpreter); 4 leaves 1152 on them
    and subtracts 1152 times q's (p's) row sum from each score (output) tile instead."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    length = tl.load(LEN + b * stride_lb + h * stride_lh).to(tl.int32)
    length = tl.minimum(tl.maximum(length, 0), C)
    start = pid_s * split_size
    end = tl.minimum(start + split_size, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < D

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if F16:  # each query head over its max |q| in fp16 (no overflow, no subnormals at the top of its range);
        # max|q| * scale comes back on its scores with the keys' scales
        q = q.to(tl.float32)
        q_max = tl.max(tl.abs(q), 1)
        q_max = tl.where(q_max > 0.0, q_max, 1.0)
        q = (q / q_max[:, None]).to(tl.float16)
        s_scale = (q_max * qk_scale).to(tl.float32)[:, None]
        if F16_CVT == 4:  # the codes keep +1152: their scores carry 1152 * sum(q)
            q_off = 1152.0 * tl.sum(q.to(tl.float32), 1)[:, None]
        if UPCAST:  # the interpreter: fp16 values, float32 products and sums (as the tensor cores accumulate)
            q = q.to(tl.float32)

    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    ks_base = KS + b64 * stride_ksb + h64 * stride_ksh
    vs_base = VS + b64 * stride_vsb + h64 * stride_vsh

    if F16:  # the largest V scale of the split (its scales are 1/D of its codes' bytes), multiplied back at the end
        v_max = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + offs_n
            v_max = tl.maximum(v_max, tl.load(vs_base + offs * stride_vsn, mask=offs < end, other=0.0))
        v_top = tl.max(v_max, 0)
        v_top = tl.where(v_top > 0.0, v_top, 1.0)
        v_inv = 1.0 / v_top

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        n_mask = offs < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if F16:
            k = _i8_to_f16(k, F16_CVT)
            v = _i8_to_f16(v, F16_CVT)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
        elif QUANT:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if F16_CVT == 4:
            s = s - q_off
        if QUANT:
            k_sc = tl.load(ks_base + offs * stride_ksn, mask=n_mask, other=0.0).to(tl.float32)
            s = s * k_sc[None, :]
        if F16:
            s = s * s_scale
        else:
            s = (s * qk_scale).to(tl.float32)  # inductor may pass the scale as fp64
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            v_sc = tl.load(vs_base + offs * stride_vsn, mask=n_mask, other=0.0).to(tl.float32)
            if F16:  # relative to the split's largest: a small V does not fall into fp16's subnormals
                v_sc = v_sc * v_inv
            p = p * v_sc[None, :]
        if F16:
            p = p.to(tl.float16)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        if F16_CVT == 4:  # the codes' +1152 times the (fp16) weights' sum
            pv = pv - 1152.0 * tl.sum(p.to(tl.float32), 1)[:, None]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if F16:
        acc = acc * v_top
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE:
        o_ptrs = OUT + b64 * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=gd_mask)
    else:
        active = start < length
        row = pid_bh.to(tl.int64) * num_splits + pid_s
        lse = m_i + tl.log2(tl.where(has, l_i, 1.0))
        p_ptrs = O_PART + (row * G + offs_g)[:, None] * D + offs_d[None, :]
        tl.store(p_ptrs, out, mask=gd_mask & active)
        tl.store(LSE_PART + row * G + offs_g, lse, mask=g_mask & active)


def _decode_merge_kernel_fn(
    O_PART,
    LSE_PART,
    LEN,
    OUT,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    Hkv,
    C,
    split_size,
    num_splits,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # over B * Hkv * G query heads
    bh = pid // G
    g = pid % G
    b = bh // Hkv
    h = bh % Hkv
    length = tl.load(LEN + b * stride_lb + h * stride_lh).to(tl.int32)
    length = tl.minimum(tl.maximum(length, 0), C)
    n_active = tl.minimum((length + split_size - 1) // split_size, num_splits)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row0 = bh.to(tl.int64) * num_splits

    # pass 1: max log-sum-exp over the active splits
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_active, BLOCK_S):
        s_idx = s0 + offs_s
        s_mask = s_idx < n_active
        lse = tl.load(LSE_PART + (row0 + s_idx) * G + g, mask=s_mask, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    m = tl.where(n_active > 0, m, 0.0)

    # pass 2: weighted sum of the partial outputs
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_active, BLOCK_S):
        s_idx = s0 + offs_s
        s_mask = s_idx < n_active
        lse = tl.load(LSE_PART + (row0 + s_idx) * G + g, mask=s_mask, other=float("-inf"))
        w = tl.exp2(lse - m)
        w = tl.where(s_mask, w, 0.0)
        o = tl.load(
            O_PART + ((row0 + s_idx) * G + g)[:, None] * D + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(o * w[:, None], 0)
        w_vec += w
    w_sum = tl.sum(w_vec, 0)
    out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)
    out = tl.where(w_sum > 0.0, out, 0.0)
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh + offs_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=d_mask)


if HAS_TRITON:
    _i8_to_f16 = triton.jit(_i8_to_f16_fn)
    _decode_split_kernel = triton.jit(_decode_split_kernel_fn)
    _decode_merge_kernel = triton.jit(_decode_merge_kernel_fn)
else:  # pragma: no cover
    _decode_split_kernel = None
    _decode_merge_kernel = None


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def _launch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: Optional[float] = None,
    split_size: Optional[int] = None,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    *,
    interpret: Optional[bool] = None,
    wrap=None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    sm_count: Optional[int] = None,
    out: Optional[Tensor] = None,
    poison: bool = False,
    f16=None,
) -> Tensor:
    """Run the two Triton kernels. Under TRITON_INTERPRET=1 (set before triton is imported) they
    run in Triton's CPU interpreter on CPU tensors (tests); ``wrap`` is ``torch.library.wrap_triton`` inside
    the triton_op.
    block_n / num_warps / num_stages / sm_count override the defaults (benchmark sweeps), as does
    `_LAUNCH_OVERRIDE` where they are not given; f16: fp16 dots on int8 codes (the kernel's F16): True or a
    conversion's name in `F16_CVTS`.
    Tests: ``out`` is a preallocated (B, Hq, D) output; ``poison`` fills output and workspace
    with NaN first, so an element the kernels fail to write (or a stale partial the merge
    wrongly reads) shows up as NaN."""
    B, Hq, D, Hkv, C = check_decode_shapes(q, k_cache, v_cache, lengths, k_scale, v_scale)
    G = Hq // Hkv
    if scale is None:
        scale = D**-0.5
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, Hq, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be (B, Hq, D) in q's dtype with a contiguous last dim")
    if poison:
        out.fill_(float("nan"))
    if B == 0 or Hq == 0 or D == 0:
        return out
    if C == 0:
        return out.zero_()

    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    is_interp = _is_interpreted(_decode_split_kernel)
    if interpret is None:
        interpret = is_interp
    if bool(interpret) != is_interp:
        raise RuntimeError(
            "Triton's CPU interpreter needs TRITON_INTERPRET=1 in the environment before triton is "
            "first imported (its tl.* helpers are decorated at import); CUDA launches need it unset."
        )
    split_k, merge_k = _decode_split_kernel, _decode_merge_kernel
    if wrap is not None and not interpret:
        split_k, merge_k = wrap(split_k), wrap(merge_k)

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1 and not (k_scale is not None and v_cache.stride(-2) == 1):
        v_cache = v_cache.contiguous()  # int8 V may be slot-major: (.., C, D) with the slots contiguous
    quant = k_scale is not None
    if quant:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"unsupported q dtype {q.dtype}")
    else:
        if not (q.dtype == k_cache.dtype == v_cache.dtype):
            raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"unsupported dtype {q.dtype}")

    # bf16 arithmetic is wrong in the interpreter: compute in fp32 there.
    upcast = bool(interpret and (q.dtype == torch.bfloat16 or (not quant and k_cache.dtype == torch.bfloat16)))
    if quant and upcast:
        q = q.float()  # the int8 path converts K/V to q's dtype
    ieee = q.dtype == torch.float32 or upcast

    override = _LAUNCH_OVERRIDE
    if override:
        block_n = override.get("block_n") if block_n is None else block_n
        num_warps = override.get("num_warps") if num_warps is None else num_warps
        num_stages = override.get("num_stages") if num_stages is None else num_stages
        f16 = override.get("f16") if f16 is None else f16
    # fp16 dots on int8 codes: a benchmark option until measured (RESULTS.md section 28e)
    f16_cvt = _f16_cvt(f16, bool(interpret))
    f16 = f16 not in (None, False) and quant
    if sm_count is None:
        sm_count = _sm_count(q.device.index or 0) if q.device.type == "cuda" else _DEFAULT_SM_COUNT
    cfg, split_size, num_splits = launch_settings(
        B,
        Hkv,
        C,
        D,
        G,
        q.element_size() if quant else k_cache.element_size(),
        quant,
        sm_count,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        split_size=split_size,
        num_splits=override.get("num_splits"),
    )
    BLOCK_N = cfg["BLOCK_N"]
    single = num_splits == 1

    dummy = torch.empty((1,), dtype=torch.float32, device=q.device)
    if quant:
        ks, vs = k_scale, v_scale
        ks_strides = ks.stride()
        vs_strides = vs.stride()
    else:
        ks = vs = dummy
        ks_strides = vs_strides = (0, 0, 0)
    if single:
        o_part = lse_part = dummy
    else:
        o_part = torch.empty((B * Hkv * num_splits * G * D,), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * Hkv * num_splits * G,), dtype=torch.float32, device=q.device)
        if poison:
            o_part.fill_(float("nan"))
            lse_part.fill_(float("nan"))

    split_k[(B * Hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        lengths,
        o_part,
        lse_part,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        ks_strides[0],
        ks_strides[1],
        ks_strides[2],
        vs_strides[0],
        vs_strides[1],
        vs_strides[2],
        lengths.stride(0),
        lengths.stride(1),
        out.stride(0),
        out.stride(1),
        Hkv,
        C,
        split_size,
        num_splits,
        float(scale) * _LOG2E,
        G=G,
        D=D,
        BLOCK_G=cfg["BLOCK_G"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_N=BLOCK_N,
        SINGLE=single,
        QUANT=quant,
        UPCAST=upcast,
        IEEE=ieee and not (f16 and not interpret),
        F16=f16,
        F16_CVT=f16_cvt,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if not single:
        merge_k[(B * Hkv * G,)](
            o_part,
            lse_part,
            lengths,
            out,
            lengths.stride(0),
            lengths.stride(1),
            out.stride(0),
            out.stride(1),
            Hkv,
            C,
            split_size,
            num_splits,
            G=G,
            D=D,
            BLOCK_D=cfg["BLOCK_D"],
            BLOCK_S=min(64, triton.next_power_of_2(num_splits)),
            num_warps=4,
            num_stages=1,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Custom op + public API
# ----------------------------------------------------------------------------------------------
_OP = None
if HAS_TRITON and hasattr(torch.library, "triton_op"):

    @torch.library.triton_op("dms_flex::decode_attention", mutates_args=())
    def _decode_attention_op(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        lengths: Tensor,
        scale: float,
        split_size: int,
        k_scale: Optional[Tensor] = None,
        v_scale: Optional[Tensor] = None,
    ) -> Tensor:
        if q.device.type != "cuda":
            return decode_attention_reference(q, k_cache, v_cache, lengths, scale, k_scale=k_scale, v_scale=v_scale)
        return _launch(
            q,
            k_cache,
            v_cache,
            lengths,
            scale,
            split_size if split_size > 0 else None,
            k_scale,
            v_scale,
            interpret=False,
            wrap=torch.library.wrap_triton,
        )

    _OP = torch.ops.dms_flex.decode_attention


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: Optional[float] = None,
    *,
    split_size: Optional[int] = None,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> Tensor:
    """Decode attention over a compact per-(row, kv head) cache. See the module docstring.

    CUDA tensors run the Triton split-KV kernel (a ``torch.library.triton_op``: capturable in
    CUDA graphs, traceable by torch.compile(fullgraph=True)); other devices use
    :func:`decode_attention_reference`. ``split_size`` (slots per split, best a multiple of the
    kernel's BLOCK_N) overrides the shape-based heuristic.
    """
    check_decode_shapes(q, k_cache, v_cache, lengths, k_scale, v_scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.device.type == "cuda" and _OP is not None:
        return _OP(q, k_cache, v_cache, lengths, float(scale), int(split_size or 0), k_scale, v_scale)
    return decode_attention_reference(q, k_cache, v_cache, lengths, scale, k_scale=k_scale, v_scale=v_scale)
