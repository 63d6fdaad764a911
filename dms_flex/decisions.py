"""Where eviction decisions come from, and how they are relaxed for training.

Shapes: q is (B, Hq, T, D) with Hq = Hkv * G; decision logits are (B, Hkv, T) in float32.
Convention (docs/design.md, "The shift"): the logit produced at position t+1 decides the fate of token t;
`shift_to_decided_token` turns "logit at position t" into "decision about token t".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DMSConfig

# Stands for "no next token decides me" (last position, document end): never evicted.
# Finite so that noise, scaling and autograd never see inf - inf.
KEEP_LOGIT = -1.0e4


def borrowed_logits(q: torch.Tensor, num_kv_heads: int, cfg: DMSConfig) -> torch.Tensor:
    """Borrowed-neuron decision logits: last channel of the first query head of each KV group.

    q must be read after any q-norm and before RoPE.
    """
    group = _group_size(q.shape[1], num_kv_heads)
    raw = q[:, ::group, :, -1].float()
    return raw * cfg.alpha_scale - cfg.alpha_offset


def zero_borrowed_channel(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q with the borrowed channel set to 0 in the first head of each group (out of place).

    Called before RoPE and again after it: RoPE mixes channel D-1 with its partner, so zeroing
    only once would let the partner leak back into it.
    """
    group = _group_size(q.shape[1], num_kv_heads)
    keep = torch.ones(q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
    keep[::group, -1] = 0
    return q * keep[None, :, None, :]


class DMSAdapter(nn.Module):
    """Adapter variant: l = Linear(RMSNorm(x)) * alpha_scale - alpha_offset, x = the residual stream
    entering the layer. Zero-initialised, so a fresh retrofit starts as the unmodified model."""

    compiled_one_token = True  # False: compiled decode steps keep the two-module form (benchmark ablation)

    def __init__(self, hidden_dim: int, num_kv_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_dim, eps=eps)
        self.linear = nn.Linear(hidden_dim, num_kv_heads, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, cfg: DMSConfig) -> torch.Tensor:
        """x: (B, T, hidden) -> logits (B, Hkv, T) float32."""
        if (
            self.compiled_one_token
            and x.shape[1] == 1
            and self.linear.weight.dtype == torch.float32
            and torch.compiler.is_compiling()
        ):
            h = self.one_token(x)
        else:
            # conversions only where the dtypes differ: a decode step runs this once per layer, and on the
            # CPU each call's dispatch costs microseconds (no-op .float() / .to() calls included)
            h = self.norm(_as(x, torch.float32))
            h = self.linear(_as(h, self.linear.weight.dtype))
        return _as(h, torch.float32).transpose(1, 2) * cfg.alpha_scale - cfg.alpha_offset

    def one_token(self, x: torch.Tensor) -> torch.Tensor:
        """linear(norm(x)) as one reduction over the hidden dimension: rsqrt(mean(x^2) + eps) * (x . w_j)
        with the norm's scale folded into the rows w_j (float32 adapter). A compiled decode step makes
        this one kernel instead of a norm kernel, a float32 GEMM and its split-K reduction per layer
        (benchmarks/RESULTS.md, section 23); the same math as the two-module form up to summation order."""
        xf = _as(x, torch.float32)
        w = self.linear.weight if self.norm.weight is None else self.linear.weight * self.norm.weight
        dot = (xf.unsqueeze(-2) * w.float()).sum(-1)  # (B, T, Hkv)
        return dot * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.one_token_eps)

    @property
    def one_token_eps(self) -> float:
        """The norm's eps as `one_token` (and the fused decode kernel, kernels/decode_update.py) add it."""
        return self.norm.eps if self.norm.eps is not None else torch.finfo(torch.float32).eps


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def sync_adapter(attn: nn.Module, cfg: DMSConfig, hidden_dim: int, num_kv_heads: int, device) -> None:
    """Give an attention module the adapter its DMS settings need: a zero-initialised `dms_adapter`
    for the adapter variant (kept if present), none otherwise (both integrations call this)."""
    if cfg.decision == "adapter" and not hasattr(attn, "dms_adapter"):
        attn.dms_adapter = DMSAdapter(hidden_dim, num_kv_heads).to(device=device)
    if cfg.decision != "adapter" and hasattr(attn, "dms_adapter"):
        del attn.dms_adapter


def decide_and_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: Optional[DMSConfig],
    rope,
    num_kv_heads: int,
    *,
    adapter: Optional[nn.Module] = None,
    x: Optional[torch.Tensor] = None,
):
    """The decision and RoPE step of one attention layer, for every integration.

    q (B, Hq, T, D), k (B, Hkv, T, D) after any q/k norm and before RoPE; rope(q, k) -> (q, k)
    rotated, same layout; cfg None: eviction off (no decisions, the channel kept). The borrowed
    logit is read here (after q-norm, before RoPE) and its channel zeroed before and after RoPE;
    the adapter reads x, the layer's input. Returns q, k after RoPE and the raw decision logits
    (B, Hkv, T) float32 (None without cfg), per-layer scope applied (docs/design.md, "Decision sources").
    """
    logits = decide(q, cfg, num_kv_heads, adapter=adapter, x=x)
    if cfg is not None and cfg.decision == "borrowed":
        q = zero_borrowed_channel(q, num_kv_heads)
    q, k = rope(q, k)
    if cfg is not None and cfg.decision == "borrowed":
        q = zero_borrowed_channel(q, num_kv_heads)  # RoPE mixed the partner channel back in
    return q, k, logits


def decide(
    q: torch.Tensor,
    cfg: Optional[DMSConfig],
    num_kv_heads: int,
    *,
    adapter: Optional[nn.Module] = None,
    x: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """The decision logits (B, Hkv, T) float32 of `decide_and_rope` (None without cfg), q before RoPE.
    A caller that rotates q itself must zero the borrowed channel before and after RoPE as
    `decide_and_rope` does (the fused decode kernel does: kernels/decode_update.py)."""
    if cfg is None:
        return None
    if cfg.decision == "borrowed":
        logits = borrowed_logits(q, num_kv_heads, cfg)
    else:
        if adapter is None or x is None:
            raise RuntimeError("the adapter variant needs the layer's dms_adapter and its input x")
        logits = adapter(x, cfg)
    return apply_scope(logits, cfg)


def apply_scope(logits: torch.Tensor, cfg: DMSConfig) -> torch.Tensor:
    """Per-layer mode broadcasts KV head 0's decision to every KV head."""
    if cfg.scope == "layer":
        return logits[:, :1].expand_as(logits)
    return logits


def shift_to_decided_token(logits: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """decided[..., t] = logits[..., t+1]; the last position (and the last token of each packed
    document, whose successor belongs to another document) gets KEEP_LOGIT."""
    pad = torch.full_like(logits[..., :1], KEEP_LOGIT)
    shifted = torch.cat([logits[..., 1:], pad], dim=-1)
    if doc_ids is not None:
        boundary = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T-1): t is the last token of its document
        boundary = torch.cat([boundary, torch.ones_like(boundary[:, :1])], dim=-1)
        shifted = shifted.masked_fill(boundary[:, None, :], KEEP_LOGIT)
    return shifted


def logistic_noise(shape, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Difference of two Gumbel(0, 1) samples, i.e. Logistic(0, 1)."""
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def relax(
    decided_logits: torch.Tensor,
    cfg: DMSConfig,
    *,
    training: bool,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
):
    """Returns (log_keep, alpha_st).

    log_keep = log(1 - alpha) = logsigmoid(-(l + n) / tau): the additive score bias for far keys.
    alpha_st: straight-through hard decision (forward: alpha > 0.5, backward: d alpha).
    noise: a Logistic(0, 1) sample to use (activation checkpointing draws it once, outside the
    recomputed region); default draws one from `generator`.
    Without training there is no noise and the hard rule `l > 0 evicts` holds exactly:
    log_keep is 0 or -inf.
    """
    if not training:
        evict = hard_evict(decided_logits)
        log_keep = torch.zeros_like(decided_logits).masked_fill(evict, float("-inf"))
        return log_keep, evict.float()
    if noise is None:
        noise = logistic_noise(decided_logits.shape, decided_logits.device, generator)
    z = decided_logits + noise
    log_keep = F.logsigmoid(-z / cfg.tau)
    alpha = torch.sigmoid(z / cfg.tau)
    alpha_st = (alpha > 0.5).float() - alpha.detach() + alpha
    return log_keep, alpha_st


def hard_evict(decided_logits: torch.Tensor) -> torch.Tensor:
    """Eval/inference decision: a positive logit evicts."""
    return decided_logits > 0


def _group_size(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a positive multiple of KV heads ({num_kv_heads})")
    return num_heads // num_kv_heads
