"""The plain-PyTorch references of the kernels, beside them (docs/design.md, "Kernels and their
references"). Each kernel is tested against the one named here:

- `dense_dms_attention`: THE reference of the training kernel (kernels/train_attention.py) and the
  CPU / small-head training path: softmax over an explicit (B, Hkv, T, T) bias from masks.py's rule.
- `masked_attention`: THE reference of the prefill kernel (kernels/prefill.py): attention over an
  explicit (B, Hkv, n, S) visibility mask, the CPU prefill path of `DMSKVCache.append`.
- `decode_attention_reference`: THE reference of the split-KV decode kernel (kernels/decode.py),
  float32 math over (B, Hkv, C, D) buffers and per-head lengths.
- `decode_attention_dense`: the CPU decode path over a `DMSKVCache` (the same math as
  `decode_attention_reference`, reading only the used slot prefix).

These materialise what the kernels never do (T x T, n x S); they are for tests and small CPU runs.
Nothing here imports the kernels, so kernels and integrations import this module without a cycle.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks


def dense_dms_attention(q, k, v, log_keep, window, *, doc_ids=None, scale=None):
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), log_keep (B, Hkv, T): softmax(q k^T * scale + bias) v with
    masks.dense_bias (causal/document, log_keep on far keys); GQA by expansion."""
    group = q.shape[1] // k.shape[1]
    bias = masks.dense_bias(log_keep.float(), window, doc_ids).to(q.dtype)
    bias = bias.repeat_interleave(group, dim=1)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Reference attention with a (B, Hkv, Tq, S) boolean visibility mask, GQA by expansion."""
    group = q.shape[1] // k.shape[1]
    mask = visible.repeat_interleave(group, dim=1)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_dense(q: torch.Tensor, cache, scale: Optional[float] = None) -> torch.Tensor:
    """q: (B, Hq, 1, D) over live slots [0, length): the portable reference for the decode kernel.

    The G query heads of a group ride as G query rows of their KV head, so K/V are never expanded.
    Eager CPU runs read only the used prefix of the slots; compiled/CUDA runs keep static shapes.
    """
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _decode_attention_cpu(q, cache, scale)
    B, Hq, _, D = q.shape
    H = cache.length.shape[1]
    n = cache.capacity
    live = (torch.arange(n, device=q.device)[None, None] < cache.length[..., None])[:, :, None, :]
    qg = q.reshape(B, H, Hq // H, D)
    k, v = cache._read(n, q.dtype)
    if q.is_cuda:
        out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=live, scale=scale)
        return out.reshape(B, Hq, 1, D)
    # CPU: plain math (the CPU SDPA kernels are slow for one query row against a masked cache)
    scale = D**-0.5 if scale is None else scale
    scores = (qg.float() @ k.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~live, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).reshape(B, Hq, 1, D).to(q.dtype)


def _decode_attention_cpu(q: torch.Tensor, cache, scale: Optional[float] = None) -> torch.Tensor:
    """Eager CPU: the math above (bit for bit) over the used slot prefix only, in few ops: a decode
    step runs it once per layer, and on the CPU each op's dispatch costs microseconds. The mask and
    the NaN guard are applied only when some (row, KV head) holds fewer slots than the longest
    (always, under DMS) or none at all; conversions only where the dtypes differ."""
    lengths = [n for row in cache.length.tolist() for n in row]
    lo, n = min(lengths), max(max(lengths), 1)
    dead = torch.arange(n, device=q.device) >= cache.length.view(-1, 1, 1) if lo < n else None
    return decode_attention_prefix(q, cache, lengths, dead, scale)


def decode_attention_prefix(
    q: torch.Tensor, cache, lengths: list, dead: Optional[torch.Tensor], scale: Optional[float] = None
) -> torch.Tensor:
    """`_decode_attention_cpu` with the cache's lengths given: `lengths` the B*H lengths on the host,
    `dead` (B*H, 1, >= max(lengths)) bool, True at each (row, KV head)'s slots past its length (read
    only where the lengths differ). A decode step over stacked caches builds both once for all layers
    (torchtune_model._decode_step_stacked)."""
    B, Hq, _, D = q.shape
    H = cache.length.shape[1]
    lo, n = min(lengths), max(max(lengths), 1)
    if cache.quantized:
        k, v = cache._read(n, q.dtype)
        k, v = k.reshape(B * H, n, D), v.reshape(B * H, n, D)
    else:  # _read without its copies: (B * H, n, D) views of the (contiguous) buffers, one op each
        k, v = (_prefix(buf, B * H, n, D) for buf in (cache.k, cache.v))
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
    qg = q.reshape(B * H, Hq // H, D)
    if q.dtype != torch.float32:
        qg, k, v = qg.float(), k.float(), v.float()
    scale = D**-0.5 if scale is None else scale
    scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)
    if lo < n:
        scores.masked_fill_(dead[..., :n], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if lo == 0:  # a (row, KV head) with no slots: its softmax row is NaN, its output 0
        probs = probs.nan_to_num(0.0)
    out = torch.bmm(probs, v).view(B, Hq, 1, D)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _prefix(buf: torch.Tensor, rows: int, n: int, D: int) -> torch.Tensor:
    """buf (B, H, S, D) -> the (B * H, n, D) view of each (row, KV head)'s first n slots."""
    if not buf.is_contiguous():
        return buf.reshape(rows, -1, D)[:, :n]
    return buf.as_strided((rows, n, D), (buf.shape[2] * D, D, 1), buf.storage_offset())


def check_decode_shapes(q, k_cache, v_cache, lengths, k_scale=None, v_scale=None):
    """Validates decode-attention arguments (see kernels/decode.py); returns (B, Hq, D, Hkv, C)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be (B, Hkv, C, D), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape
    Bk, Hkv, C, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} disagree on B or D")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if tuple(lengths.shape) != (B, Hkv):
        raise ValueError(f"lengths must be (B, Hkv)=({B}, {Hkv}), got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together")
    if k_scale is not None:
        if k_cache.dtype != torch.int8 or v_cache.dtype != torch.int8:
            raise ValueError("k_scale/v_scale need int8 k_cache/v_cache")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if tuple(s.shape) != (B, Hkv, C):
                raise ValueError(f"{name} must be (B, Hkv, C)=({B}, {Hkv}, {C}), got {tuple(s.shape)}")
    elif k_cache.dtype == torch.int8 or v_cache.dtype == torch.int8:
        raise ValueError("int8 k_cache/v_cache need k_scale and v_scale")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be floating point, got {q.dtype}")
    return B, Hq, D, Hkv, C


def decode_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: Optional[float] = None,
    *,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> Tensor:
    """Plain-PyTorch decode attention (float32 math, masked softmax). See the module docstring."""
    B, Hq, D, Hkv, C = check_decode_shapes(q, k_cache, v_cache, lengths, k_scale, v_scale)
    G = Hq // Hkv
    if scale is None:
        scale = D**-0.5
    k = k_cache.float()
    v = v_cache.float()
    if k_scale is not None:
        k = k * k_scale.float()[..., None]
        v = v * v_scale.float()[..., None]
    lens = lengths.to(torch.int64).clamp(0, C)
    live = torch.arange(C, device=k.device) < lens[..., None]  # (B, Hkv, C)
    # dead slots may hold NaN/inf: zero them so that 0 * NaN never reaches the output
    k = torch.where(live[..., None], k, 0.0)
    v = torch.where(live[..., None], v, 0.0)
    qf = q.float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhcd->bhgc", qf, k) * scale
    s = s.masked_fill(~live[:, :, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: no -inf - -inf
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhgc,bhcd->bhgd", p, v) / denom.clamp_min(1e-30)  # empty rows -> 0
    return o.reshape(B, Hq, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Split heuristic (shapes only)
# ----------------------------------------------------------------------------------------------
