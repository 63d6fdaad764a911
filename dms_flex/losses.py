"""Retrofit losses: the one-sided compression loss and chunked distillation (docs/design.md, "Losses and schedule")."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def fraction_evicted(alpha_st: Sequence[torch.Tensor], valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per batch row: mean of the straight-through alpha over layers, KV heads and tokens.

    alpha_st: one (B, Hkv, T) tensor per layer. valid: (B, T) bool, False on padding.
    """
    stacked = torch.stack(list(alpha_st), dim=0)  # (L, B, H, T)
    if valid is None:
        return stacked.mean(dim=(0, 2, 3))
    w = valid[None, :, None, :].to(stacked.dtype)
    L, _, H, _ = stacked.shape
    denom = (valid.sum(-1).to(stacked.dtype) * L * H).clamp_min(1)
    return (stacked * w).sum(dim=(0, 2, 3)) / denom


def compression_loss(
    alpha_st: Sequence[torch.Tensor], alpha_target: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """max(0, alpha_target - frac_evicted), averaged over batch rows. One-sided: evicting more than
    the target costs nothing, so it never pushes evictions down."""
    return F.relu(alpha_target - fraction_evicted(alpha_st, valid)).mean()


def distillation_mask(labels: torch.Tensor, ignore_index: int = -100, eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """(B, T) bool: positions that count in the KD loss (not padding, not end-of-sequence)."""
    mask = labels != ignore_index
    for eos in eos_ids:
        mask &= labels != eos
    return mask


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    output_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    teacher_output_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over masked positions.

    Hidden states (B, T, d) go through the output projection `output_weight` (V, d) one chunk of
    tokens at a time under activation checkpointing, so neither the forward nor the backward holds
    the full (tokens x vocab) fp32 logits. `teacher_output_weight` is the teacher's own projection
    when the teacher is a frozen copy (all weights train); default: the student's, which is right
    when the base, output projection included, is frozen.
    """
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    w_t = (output_weight if teacher_output_weight is None else teacher_output_weight).detach()
    m = mask.reshape(-1)
    total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
    for start in range(0, s.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(_kd_chunk, s[sl], t[sl], output_weight, w_t, m[sl], temperature, use_reentrant=False)
    return total / m.sum().clamp_min(1)


def _kd_chunk(s, t, w, w_t, m, temperature):
    log_p_s = F.log_softmax(_upcast(s @ w.t()) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(t @ w_t.t()) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (kl * m).sum()


def kd_loss_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Unchunked KL(teacher || student) on full logits: the reference for chunked_kd_loss."""
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax in at least fp32 (bf16 logits lose the tail of the distribution)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
