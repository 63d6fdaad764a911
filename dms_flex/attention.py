"""DMS training/prefill attention: on CUDA the Triton training kernel (kernels/train_attention.py)
or FlexAttention, dense masked SDPA elsewhere.

All compute softmax(q k^T * scale + bias) v where bias is -inf outside causal/document and
log(1 - alpha_j) on far keys (i - j > window); see masks.py for the rule. The dense path is the
reference the fast paths are tested against, and the CPU path (flex has no CPU backward). Inference
prefill (hard decisions) runs kernels/prefill.py, the training kernel's forward with a 0 / -inf bias.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import masks
from .kernels.reference import dense_dms_attention


# "auto" picks the Triton training kernel (kernels/train_attention.py) on CUDA when this is True:
# on the H200 it is exact to the reference, 0.70-0.91x the time of the flex path and works under
# torch.compile(fullgraph=True) (RESULTS.md sections 7-8); False: compiled flex.
USE_TRITON_TRAIN_KERNEL = True


def dms_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    window: int,
    *,
    doc_ids: Optional[torch.Tensor] = None,
    block_mask=None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, T, D); log_keep: (B, Hkv, T) float (0 / -inf when hard).

    backend: "auto" (flex on CUDA, or the Triton kernel if USE_TRITON_TRAIN_KERNEL; dense
    otherwise), "flex", "triton" (kernels.train_attention; dense fallback off CUDA) or "dense".
    block_mask: optional precomputed `make_block_mask(...)` result, shared by all layers of a step
    (flex only; the Triton kernel takes doc_ids).
    """
    _check_shapes(q, k, v, log_keep)
    if backend == "auto":
        backend = resolve_backend(q.device, q.shape[-1])
    if backend == "dense":
        return dense_dms_attention(q, k, v, log_keep, window, doc_ids=doc_ids, scale=scale)
    if backend == "flex":
        return flex_dms_attention(q, k, v, log_keep, window, doc_ids=doc_ids, block_mask=block_mask, scale=scale)
    if backend == "triton":
        from .kernels.train_attention import dms_train_attention

        return dms_train_attention(q, k, v, log_keep, window, doc_ids=doc_ids, scale=scale)
    raise ValueError(f"backend={backend!r}: expected 'auto', 'flex', 'triton' or 'dense'")


def dms_hard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted: torch.Tensor,
    window: int,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Inference prefill: exact attention under the hard rule. evicted (B, Hkv, T) bool marks the
    tokens their successor evicts. "auto": the Triton prefill kernel (kernels/prefill.py: the
    training kernel's forward with a 0 / -inf bias, nothing T x T) where it runs, else "dense",
    the masked-SDPA reference."""
    from .kernels import prefill as prefill_kernel

    if backend == "auto":
        backend = "triton" if prefill_kernel.supported(q) else "dense"
    if backend == "dense":
        log_keep = torch.zeros(evicted.shape, device=q.device).masked_fill(evicted, float("-inf"))
        return dense_dms_attention(q, k, v, log_keep, window, scale=scale)
    if backend != "triton":
        raise ValueError(f"backend={backend!r}: expected 'auto', 'triton' or 'dense'")
    return prefill_kernel.prefill_attention(q, k, v, evicted, window, scale=scale)


def flex_supported(device, head_dim: int) -> bool:
    """The compiled flex / Triton kernels need CUDA and a head dim of at least 16 (tl.dot's minimum);
    smaller heads (tiny test models) take the dense reference."""
    return torch.device(device).type == "cuda" and head_dim >= 16


def resolve_backend(device, head_dim: int) -> str:
    """What "auto" means for training attention on a device and head size: the Triton kernel on
    CUDA (USE_TRITON_TRAIN_KERNEL; eager or inside torch.compile), else compiled flex; the dense
    reference off CUDA and for heads under 16."""
    from .kernels.train_attention import runs_here

    if USE_TRITON_TRAIN_KERNEL and torch.device(device).type == "cuda" and runs_here(device, head_dim):
        return "triton"
    return "flex" if flex_supported(device, head_dim) else "dense"


def make_block_mask(doc_ids: Optional[torch.Tensor], batch: int, seq_len: int, device):
    """Causal (+ document) block mask; build once per step and pass to every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:
        return create_block_mask(masks.causal_mask_mod, None, None, seq_len, seq_len, device=device)
    return create_block_mask(masks.generate_document_causal_mask(doc_ids), batch, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_dms_attention(
    q, k, v, log_keep, window, *, doc_ids=None, block_mask=None, scale=None, compiled: Optional[bool] = None
):
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, T, _ = q.shape
    group = Hq // k.shape[1]
    if block_mask is None:
        block_mask = make_block_mask(doc_ids, B, T, q.device)
    score_mod = masks.generate_dms_score_mod(log_keep.float(), window, group)
    fn = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=group > 1, scale=scale)


def _check_shapes(q, k, v, log_keep):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q (B, Hq, T, D) and k, v (B, Hkv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, length, head dim, "
            f"or query heads not a multiple of KV heads)"
        )
    if log_keep.shape != (B, k.shape[1], T):
        raise ValueError(f"log_keep must be (B, Hkv, T) = {(B, k.shape[1], T)}, got {tuple(log_keep.shape)}")
