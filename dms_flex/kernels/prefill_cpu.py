"""Prefill attention under the hard rule on the CPU, by query blocks over only the keys a block can see.

`DMSKVCache.append` attends n new tokens over the live cache slots plus themselves. On CUDA the Triton
prefill kernel (kernels/prefill.py) does it; elsewhere the reference builds the full (n x S) visibility
mask per query head and runs masked SDPA over every key (`kernels/reference.masked_attention`), which on
the CPU costs ~3.4x SDPA causal at 2,048 tokens: most keys are evicted, yet every one is read and masked.

Here, per (row, KV head) and block of `BLOCK` queries, the keys split in two (docs/design.md, "Prefill"):
- far keys, older than the block's first query minus the window: far from every query of the block, so
  visible exactly when live and unmarked; they are gathered compactly (no mask);
- near keys (the rest up to the block's last query): a small mask of the hard rule (`masks.visible`).
The G query heads of the KV head ride as G x BLOCK query rows of one SDPA call, so K/V are never expanded.
Same visibility as the reference, so the same result up to the order of floating-point sums
(tests/test_cache.py checks it against the reference in float64).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import masks

BLOCK = 256  # queries per block: large enough that one SDPA call amortizes its dispatch


def blocked_prefill_attention(
    q: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    klive: torch.Tensor,
    kpos: torch.Tensor,
    kmark: torch.Tensor,
    qpos: torch.Tensor,
    lengths: torch.Tensor,
    L: int,
    window: int,
    scale: Optional[float] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """q (B, Hq, n, D) of the new tokens; k_all / v_all (B, H, L + n, D): the first L cache slots then the new
    tokens; klive / kpos / kmark (B, H, L + n): live, position, marked of each key; qpos (B, n) the new tokens'
    positions; lengths (B, H) the live slots of each (row, KV head) (slots [0, length) are live, in any
    position order: decoding reuses freed slots). A new token that is not live is padding: it also sees itself. Returns (B, Hq, n, D), what
    `masked_attention` returns for the visibility `klive & masks.visible(...)` plus the padding's self.
    block: queries per block (default `BLOCK`, read at call time)."""
    block = block or BLOCK
    B, Hq, n, D = q.shape
    H = k_all.shape[1]
    G = Hq // H
    out = torch.empty_like(q)
    far_ok = klive & ~kmark  # (B, H, S): visible to any query it is far from
    lengths_h = lengths.tolist()
    for b in range(B):
        qp_row = qpos[b]
        for h in range(H):
            n_live = int(lengths_h[b][h])
            old_pos = kpos[b, h, :n_live]  # not in position order: decoding reuses freed slots
            old_far_ok = far_ok[b, h, :n_live]
            new_far_idx = L + far_ok[b, h, L:].nonzero().squeeze(1)  # new tokens: in position order
            valid_q = klive[b, h, L:]  # (n,) False for padding
            qh = q[b, h * G : (h + 1) * G]  # (G, n, D)
            for i0 in range(0, n, block):
                i1 = min(n, i0 + block)
                C = i1 - i0
                lo_pos = int(qp_row[i0]) - window  # keys at positions < lo_pos are far from every query here
                old_far = old_pos < lo_pos
                j0 = max(0, i0 - window)  # the first new token that may be near
                far_idx = torch.cat(
                    [
                        (old_far & old_far_ok).nonzero().squeeze(1),
                        new_far_idx[: int(torch.searchsorted(new_far_idx, L + j0))],
                    ]
                )
                near_idx = torch.cat([(~old_far).nonzero().squeeze(1), torch.arange(L + j0, L + i1, device=q.device)])
                idx = torch.cat([far_idx, near_idx])
                qp = qp_row[i0:i1, None]  # (C, 1)
                vq = valid_q[i0:i1, None]  # (C, 1)
                near_vis = klive[b, h, near_idx][None] & masks.visible(
                    qp, kpos[b, h, near_idx][None], kmark[b, h, near_idx][None], window
                )
                # a padded query also sees itself (as the reference: so that no row is empty)
                self_col = near_idx[None] == (L + torch.arange(i0, i1, device=q.device))[:, None]
                near_vis = near_vis | (self_col & ~vq)
                mask = torch.cat([near_vis.new_ones(C, far_idx.numel()), near_vis], dim=1)  # (C, S_blk)
                o = F.scaled_dot_product_attention(
                    qh[:, i0:i1].reshape(1, G * C, D),
                    k_all[b, h, idx][None],
                    v_all[b, h, idx][None],
                    attn_mask=mask.repeat(G, 1)[None],
                    scale=scale,
                )
                out[b, h * G : (h + 1) * G, i0:i1] = o.reshape(G, C, D)
    return out
