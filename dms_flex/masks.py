"""The DMS visibility rule, once, plus the FlexAttention mask/score functions built on it.

The rule (docs/design.md, "Delayed eviction"): key j is visible to query i iff j <= i and NOT (j is marked and
i - j > window). In training the hard "marked" becomes the soft bias log(1 - alpha_j) on the far
region i - j > window. Every integration (training attention, prefill, the compact cache's
decode-time slot reuse, statistics) goes through `is_far` / `visible`.

Generators return functions with telling `__name__`s in the attention-gym style; all functions are
written with tensor ops only, so they work both elementwise on index grids and inside flex.
"""

from __future__ import annotations

from typing import Optional

import torch


def is_far(q_pos, k_pos, window: int):
    """True where key k_pos has left query q_pos's grace window (i - j > w)."""
    return (q_pos - k_pos) > window


def visible(q_pos, k_pos, evicted, window: int):
    """Hard rule: causal, and a marked key is gone once it is far."""
    return (k_pos <= q_pos) & ~(evicted & is_far(q_pos, k_pos, window))


# ----------------------------------------------------------------------------- flex functions
def causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def generate_document_causal_mask(doc_ids: torch.Tensor):
    """mask_mod for packed samples: causal, and a token never sees another document."""

    def document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return document_causal


def generate_dms_score_mod(log_keep: torch.Tensor, window: int, group: int):
    """score_mod adding log(1 - alpha_j) to far scores. log_keep: (B, Hkv, T); `h` is the query
    head, and the G query heads of a KV group share one decision (h // group)."""

    def dms_bias(score, b, h, q_idx, kv_idx):
        bias = log_keep[b, h // group, kv_idx]
        return score + torch.where(is_far(q_idx, kv_idx, window), bias, torch.zeros_like(bias))

    return dms_bias


def generate_dms_hard_mask(evicted: torch.Tensor, window: int, group: int, doc_ids: Optional[torch.Tensor] = None):
    """mask_mod of the hard rule (eval, prefill). evicted: (B, Hkv, T) bool for the decided token."""

    def dms_hard(b, h, q_idx, kv_idx):
        ok = visible(q_idx, kv_idx, evicted[b, h // group, kv_idx], window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return ok

    return dms_hard


# ----------------------------------------------------------------------------- dense references
def dense_bias(
    log_keep: torch.Tensor,
    window: int,
    doc_ids: Optional[torch.Tensor] = None,
    q_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, Hkv, Tq, Tk) additive bias with -inf outside causal/document, log_keep on far keys.

    q_positions (Tq,) lets the last Tq queries of a Tk-long sequence be scored (default: all).
    This materialises Tq x Tk: it is the reference and the CPU path, never the CUDA path.
    """
    B, H, T = log_keep.shape
    kpos = torch.arange(T, device=log_keep.device)
    qpos = kpos if q_positions is None else q_positions
    qi, kj = qpos[:, None], kpos[None, :]
    allowed = (kj <= qi)[None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, qpos][:, :, None] == doc_ids[:, None, :])
    far = is_far(qi, kj, window)[None, None]
    lk = log_keep[:, :, None, :]
    bias = torch.where(far, lk, torch.zeros_like(lk))
    return bias.masked_fill(~allowed[:, None], float("-inf"))
