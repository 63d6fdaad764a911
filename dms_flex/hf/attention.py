"""DMS attention through transformers' extension points.

- `dms_attention_forward`, the "dms" entry of transformers' `AttentionInterface`: where the eviction
  rule lives. It only calls `dms_flex.masks` (the full-sequence path, no cache), and the
  `DMSCacheLayer` methods (`append` for prefill and later turns, `decode` for one token per step);
- `dms_padding_mask`, the "dms" entry of `AttentionMaskInterface`: transformers then hands the
  attention function the (batch, new tokens) padding mask instead of a 4-D causal mask (DMS builds
  its own visibility);
- the full-sequence path (no cache: `use_cache=False`, or a forward with gradients): exact attention
  under the DMS hard mask, with `decided_logits` (the next-token shift with padding).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import attention as dms_attn
from .. import decisions, masks
from ..kernels.reference import masked_attention
from .cache import DMSCache, pack_order

__all__ = [
    "ATTN_IMPLEMENTATION",
    "dms_attention_forward",
    "dms_padding_mask",
    "register_with_transformers",
    "decided_logits",
]

#: the name DMS attention is registered under in transformers' AttentionInterface / AttentionMaskInterface.
ATTN_IMPLEMENTATION = "dms"


def dms_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    dms_logits: Optional[torch.Tensor] = None,
    dms_cache=None,
    position_ids: Optional[torch.Tensor] = None,
    **kwargs,
):
    """The "dms" entry of transformers' AttentionInterface.

    query (B, Hq, n, D) and key/value (B, Hkv, n, D) after RoPE; attention_mask: (B, n) bool, the
    real tokens among the n new ones (from the "dms" mask function), or None (all real);
    dms_logits (B, Hkv, n) raw decision logits (None: eviction off). Returns ((B, n, Hq, D), None).
    """
    runtime = getattr(module, "_dms_runtime", None)
    if runtime is None:
        raise RuntimeError(
            'attn_implementation="dms" needs the DMS attention modules: load the model with '
            "dms_flex.hf.from_pretrained or call dms_flex.hf.enable_dms(model) first"
        )
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError(
            "DMS attention takes a 2-D (batch, tokens) padding mask; it got a prepared "
            f"{getattr(attention_mask, 'shape', type(attention_mask))} mask. Keep the model's "
            f'attn_implementation "dms" and pass 2-D attention masks.'
        )
    window = runtime.config.effective_window
    live = attention_mask
    if dms_cache is None:
        out = _full_sequence_attention(query, key, value, dms_logits, live, position_ids, window, scaling)
    else:
        if not isinstance(dms_cache, DMSCache):
            raise TypeError(f"a DMS model needs a dms_flex.hf.DMSCache, got {type(dms_cache).__name__}")
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            raise RuntimeError(
                "the DMS cache is an inference cache: run under torch.no_grad() (generate does), or "
                "pass use_cache=False for the differentiable full-sequence path"
            )
        layer = dms_cache.layers[module.layer_idx]
        if layer.window != window:
            raise ValueError(f"this DMSCache was made for window {layer.window}, the model's DMS window is {window}")
        n = query.shape[2]
        if n == 1 and live is None and layer.kv is not None:
            out = layer.decode(query, key, value, dms_logits, scaling)
        else:
            out = layer.append(query, key, value, dms_logits, live, scaling)
    return out.transpose(1, 2).contiguous(), None


def dms_padding_mask(*, batch_size=None, q_length=None, attention_mask=None, **kwargs):
    """The "dms" entry of transformers' AttentionMaskInterface: (B, q_length) bool real-token mask of
    the new tokens, or None when all are real (one host sync per forward, as HF's own masks do)."""
    if attention_mask is None:
        return None
    live = attention_mask[:, attention_mask.shape[-1] - q_length :].bool()
    if bool(live.all()):
        return None
    return live


def register_with_transformers() -> None:
    """Register the "dms" attention function and padding-mask function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, dms_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dms_padding_mask)


# ==================================================================================== full sequence
def decided_logits(logits: torch.Tensor, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next-token shift with padding: token t is decided by the next REAL token's logit (the last
    real token of a row is never evicted). logits (B, H, T), live (B, T) bool or None."""
    if live is None:
        return decisions.shift_to_decided_token(logits)
    B, H, T = logits.shape
    order = pack_order(live)
    packed = logits.gather(2, order[:, None, :].expand(B, H, T))
    live_packed = live.gather(1, order)
    dec = decisions.shift_to_decided_token(packed)
    next_live = torch.cat([live_packed[:, 1:], torch.zeros_like(live_packed[:, :1])], dim=1)
    dec = dec.masked_fill(~next_live[:, None, :], decisions.KEEP_LOGIT)
    return dec.gather(2, torch.argsort(order, dim=1)[:, None, :].expand(B, H, T))


def _full_sequence_attention(q, k, v, logits, live, position_ids, window, scale):
    """Exact attention under the DMS hard rule over a whole sequence (no cache)."""
    B, H, T, _ = k.shape
    dev = k.device
    if logits is None:
        evicted = torch.zeros(B, H, T, dtype=torch.bool, device=dev)
    else:
        evicted = decisions.hard_evict(decided_logits(logits, live))
    idx = torch.arange(T, device=dev)
    pos = idx[None].expand(B, T) if position_ids is None else position_ids.expand(B, T)
    if live is None and bool((pos == idx).all()):
        log_keep = torch.zeros(B, H, T, device=dev).masked_fill(evicted, float("-inf"))
        return dms_attn.dms_attention(q, k, v, log_keep, window, scale=scale)
    vis = masks.visible(pos[:, None, :, None], pos[:, None, None, :], evicted[:, :, None, :], window)
    vis = vis & (idx[None, :] <= idx[:, None])
    if live is not None:
        vis = vis & live[:, None, None, :]
        vis = vis | (torch.eye(T, dtype=torch.bool, device=dev) & ~live[:, None, :, None])  # pads see themselves
    return masked_attention(q, k, v, vis, scale=scale)
