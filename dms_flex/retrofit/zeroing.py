"""Phase 1 of a borrowed-variant retrofit: the borrowed query channel's weights scaled from 1 to 0 over
`zeroing_steps` distillation-only steps, before the CR schedule starts (docs/design.md, "Losses and
schedule").

The borrowed channel (the last channel of the first query head of each KV group, `decisions.borrowed_logits`)
is a row of q_proj's weight (and bias) per KV head. During phase 1 the student runs with eviction off,
so the channel still takes part in attention; before step k (0-based, k < N) its rows are set to
`zeroing_scale(k, N) * W0`, W0 being the original model's rows, and after the backward pass their
gradients are zeroed: the rows follow the schedule exactly (a resumed run recomputes them from the
original model) and their optimizer state stays empty for phase 2. The last phase-1 step already runs
with the rows at 0, so phase 2 starts with every borrowed logit at `-alpha_offset` (nothing evicted) and
the channel gone from attention, as the adapter variant starts from its zero adapter.

Works on plain parameters and on FSDP2's row-sharded DTensors alike: each rank writes the rows of its shard.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


def zeroing_scale(step: int, steps: int) -> float:
    """Scale of the borrowed rows in the forward of 0-based global step `step`: 1 - (step + 1) / steps
    during phase 1 (the last phase-1 step runs at 0), 0 afterwards."""
    if step >= steps:
        return 0.0
    return 1.0 - (step + 1) / steps


def borrowed_rows(attn: nn.Module) -> List[int]:
    """Rows of q_proj's output that hold the borrowed channel: channel D-1 of heads 0, G, 2G, ..."""
    group = attn.num_heads // attn.num_kv_heads
    return [h * attn.head_dim + attn.head_dim - 1 for h in range(0, attn.num_heads, group)]


def _local_rows(t: torch.Tensor, rows: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local tensor, local row indices, positions in `rows`) of the rows this rank holds."""
    if hasattr(t, "to_local"):  # a DTensor sharded on rows (FSDP2)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        lo, n = offset[0], shape[0]
    else:
        local, lo, n = t, 0, t.shape[0]
    pairs = [(r - lo, k) for k, r in enumerate(rows) if lo <= r < lo + n]
    idx = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=local.device)
    which = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return local, idx, which


class NeuronZeroing:
    """The schedule and its row writes for one student."""

    def __init__(self, steps: int, originals: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]):
        self.steps = steps
        self.originals = originals  # per layer: (W0 rows (Hkv, dim) fp32 CPU, bias rows or None)

    @classmethod
    def capture(cls, original: nn.Module, steps: int) -> "NeuronZeroing":
        """W0: the borrowed rows of the original model (before any cast of the teacher copy)."""
        out = []
        for layer in original.layers:
            q, rows = layer.attn.q_proj, borrowed_rows(layer.attn)
            w = q.weight.detach()[rows].to("cpu", torch.float32, copy=True)
            b = q.bias.detach()[rows].to("cpu", torch.float32, copy=True) if q.bias is not None else None
            out.append((w, b))
        return cls(steps, out)

    def active(self, step: int) -> bool:
        return step < self.steps

    def _params(self, student: nn.Module):
        for layer, (w0, b0) in zip(student.layers, self.originals):
            q, rows = layer.attn.q_proj, borrowed_rows(layer.attn)
            yield q.weight, w0, rows
            if b0 is not None:
                yield q.bias, b0, rows

    @torch.no_grad()
    def set_weights(self, student: nn.Module, step: int) -> float:
        """Before the forward of phase-1 step `step`: the rows at zeroing_scale(step) * W0. Returns the scale."""
        scale = zeroing_scale(step, self.steps)
        for p, orig, rows in self._params(student):
            local, idx, which = _local_rows(p, rows)
            if len(idx):
                value = (orig[which] * scale).to(local.dtype)  # fp32 product, then the parameter's dtype
                local.index_copy_(0, idx, value.to(local.device))
        return scale

    @torch.no_grad()
    def zero_grads(self, student: nn.Module) -> None:
        """After the backward of a phase-1 step: the rows get no update (and no optimizer state)."""
        for p, _, rows in self._params(student):
            if p.grad is None:
                continue
            local, idx, _ = _local_rows(p.grad, rows)
            if len(idx):
                local.index_fill_(0, idx, 0.0)
