"""Training-free KV eviction baselines in DMS's compact cache: StreamingLLM, H2O, TOVA.

They run in the same storage as DMS (`PolicyKVCache` and `DMSKVCache` are both a `cache.SlotStore`:
slots per (row, KV head), live slots [0, length), the new token written into the freed slot in place)
and are counted by the same accounting (`PolicyState` and `InferenceState` are both a
`torchtune_model.CacheState`: kv_bytes, compression), so "equal CR" means equal live KV bytes.

Budget rule. A policy at compression ratio `cr` holds at most
    budget(t) = ceil(t / cr)  slots per (row, KV head), t = tokens seen so far (prompt + generated).
The budget tracks the growing sequence, so at every moment the kept fraction is ~1/cr, which is the
quantity DMS's CR measures (kept / seen, docs/design.md, "Compression ratio"). While the budget grows (every cr-th
token) nothing is evicted; otherwise each new token evicts exactly one older token and takes its
slot. Reserved parts live inside the budget b:
- streaming: min(sinks, b-1) attention sinks (the first tokens) + the b - sinks most recent tokens;
- h2o: the b - floor(b * heavy_fraction) most recent tokens, the rest heavy hitters by accumulated
  attention (summed over every query so far: prompt queries during prefill, then each decode step);
- tova: only the newest token is reserved (TOVA's own rule lets it compete too, but its weight is
  almost always the highest; reserving it guarantees the next step sees it); all others compete on
  the current query's attention weight.
Scores are per KV head: the attention weights of the G query heads of a KV group, averaged.
Ties evict the older token. Keys keep the RoPE rotation of their original position, as in DMS's
cache (StreamingLLM's re-indexing of positions inside the cache, which it needs to run past the
model's context length, is not done: sequences here stay within the context).

Order of a decode step: the new token's query attends over the live slots plus itself (exact
attention over what is kept), the scores are updated from those weights, then one token is evicted
if the budget is exceeded. Prefill: exact full causal attention over the prompt (and whatever the
cache already holds), then the budget is applied once with the policy's rule (h2o: column sums of
the prompt queries' weights; tova: the last query's weights; streaming: positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..cache import SlotStore
from ..torchtune_model import CacheState, prefill_positions, run_layers

POLICIES = ("streaming", "h2o", "tova")


@dataclass(frozen=True)
class EvictionPolicy:
    name: str
    cr: float
    sinks: int = 4  # streaming: first tokens kept for good (StreamingLLM's attention sinks)
    heavy_fraction: float = 0.5  # h2o: share of the budget for heavy hitters (H2O's default split)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"policy {self.name!r} is not one of {POLICIES}")
        if not (isinstance(self.cr, (int, float)) and math.isfinite(self.cr) and self.cr >= 1):
            raise ValueError(f"cr={self.cr!r} must be a finite number >= 1")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks} must be >= 0")
        if not (0 <= self.heavy_fraction < 1):
            raise ValueError(f"heavy_fraction={self.heavy_fraction} must be in [0, 1)")

    def budget(self, seen: torch.Tensor) -> torch.Tensor:
        """ceil(seen / cr) slots (the small epsilon keeps 11 / 2.2 from rounding up to 6)."""
        return torch.ceil(seen.double() / self.cr - 1e-9).long().clamp_min(0)

    def reserved(self, budget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sinks, recent) token counts reserved inside each budget; sinks + recent <= budget, and
        recent >= 1 whenever budget >= 1 (the newest token is always kept)."""
        if self.name == "streaming":
            sinks = torch.minimum(torch.full_like(budget, self.sinks), (budget - 1).clamp_min(0))
            return sinks, budget - sinks
        if self.name == "h2o":
            heavy = torch.floor(budget.double() * self.heavy_fraction).long()
            return torch.zeros_like(budget), budget - heavy
        return torch.zeros_like(budget), budget.clamp(max=1)

    def capacity(self, max_seq_len: int) -> int:
        return max(int(self.budget(torch.tensor(max_seq_len))), 1)


# ============================================================================ the rule
def _protected(policy: EvictionPolicy, pos, last, budget):
    """Tokens the policy never evicts now: sinks and the recent window. pos (B, H, S); last, budget (B,)."""
    sinks, recent = policy.reserved(budget)
    return (pos < sinks[:, None, None]) | (pos > (last - recent)[:, None, None])


def _value(policy: EvictionPolicy, pos, score):
    """What a token competes on (higher stays): recency for streaming, attention for h2o/tova."""
    return pos.double() if policy.name == "streaming" else score.double()


def keep_mask(policy: EvictionPolicy, pos, live, score, last, budget) -> torch.Tensor:
    """Which of S candidate tokens stay: every live one if they fit, else the protected ones plus the
    best by (value, position). pos/live/score (B, H, S); last, budget (B,). Returns (B, H, S) bool."""
    protected = live & _protected(policy, pos, last, budget)
    value = _value(policy, pos, score).masked_fill(protected, math.inf).masked_fill(~live, -math.inf)
    # rank by value, ties by position (newer first): stable sorts, least significant key first
    by_pos = torch.sort(pos, dim=-1, descending=True, stable=True).indices
    by_value = torch.sort(value.gather(-1, by_pos), dim=-1, descending=True, stable=True).indices
    order = by_pos.gather(-1, by_value)
    S = pos.shape[-1]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=pos.device).expand_as(order))
    return live & (rank < budget[:, None, None])


def victim_slot(policy: EvictionPolicy, pos, live, score, last, budget) -> torch.Tensor:
    """The one slot to free: the lowest (value, position) among unprotected live slots. (B, H) long."""
    cand = live & ~_protected(policy, pos, last, budget)
    value = _value(policy, pos, score).masked_fill(~cand, math.inf)
    lowest = value.min(-1, keepdim=True).values
    tie = cand & (value == lowest)
    return torch.where(tie, pos, torch.full_like(pos, torch.iinfo(torch.long).max)).argmin(-1)


# ============================================================================ attention with weights
def attention_with_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: Optional[float] = None
):
    """Plain attention that also returns the weights, per KV group.

    q (B, Hq, Tq, D); k, v (B, H, S, D); visible (B, H, Tq, S) bool.
    Returns out (B, Hq, Tq, D) in q's dtype and weights (B, H, G, Tq, S) float32.
    """
    B, Hq, Tq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, H, G, Tq, D).float()
    scores = (qg @ k.float()[:, :, None].transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~visible[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
    out = weights @ v.float()[:, :, None]
    return out.reshape(B, Hq, Tq, D).to(q.dtype), weights


# ============================================================================ cache and state
class PolicyKVCache(SlotStore):
    """The shared slot store (k, v, length, slot_pos, overflow) plus one float score per slot (H2O:
    accumulated attention; TOVA: the last query's weight). Driven by prefill_with_policy and
    decode_step_with_policy; it has no DMS marks or ring."""

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, dtype=torch.bfloat16, device=None
    ):
        super().__init__(batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device)
        self.register_buffer(
            "score", torch.zeros(batch_size, num_kv_heads, capacity + 1, device=device), persistent=False
        )

    def reset(self) -> None:
        super().reset()
        self.score.zero_()

    def kept_positions(self, b: int, h: int) -> list:
        """Positions held by (row b, KV head h), sorted: for tests and inspection."""
        n = int(self.length[b, h])
        return sorted(self.slot_pos[b, h, :n].tolist())

    def append_with_policy(self, policy: EvictionPolicy, q, k, v, pos, n_valid, query_chunk: int = 512):
        """Prefill: exact causal attention of n new tokens over the live slots plus themselves, then
        keep the budget. q (B, Hq, n, D), k/v (B, H, n, D) post-RoPE; pos (B,) first new position;
        n_valid (B,) real tokens per row (right padding). Returns (B, Hq, n, D)."""
        B, H, n, D = k.shape
        C = self.capacity
        dev = k.device
        L = int(self.length.max())
        j = torch.arange(n, device=dev)
        qpos = pos[:, None] + j[None]  # (B, n)
        valid_q = j[None] < n_valid[:, None]  # (B, n)
        old_live = torch.arange(L, device=dev)[None, None] < self.length[..., None]
        kpos = torch.cat([self.slot_pos[..., :L], qpos[:, None].expand(B, H, n)], dim=-1)  # (B, H, S)
        klive = torch.cat([old_live, valid_q[:, None].expand(B, H, n)], dim=-1)
        k_all = torch.cat([self.k[:, :, :L].to(k.dtype), k], dim=2)
        v_all = torch.cat([self.v[:, :, :L].to(v.dtype), v], dim=2)
        S = L + n
        last_q = (n_valid - 1).clamp_min(0)  # (B,) index of each row's last real query
        col_sum = torch.zeros(B, H, S, device=dev)
        last_w = torch.zeros(B, H, S, device=dev)
        outs = []
        for c0 in range(0, n, query_chunk):
            c1 = min(n, c0 + query_chunk)
            vis = klive[:, :, None, :] & (kpos[:, :, None, :] <= qpos[:, None, c0:c1, None])
            # padded queries see themselves only, so no row is empty
            pad_self = (~valid_q[:, c0:c1])[:, None, :, None] & (
                torch.arange(S, device=dev)[None, None, None]
                == (L + torch.arange(c0, c1, device=dev))[None, None, :, None]
            )
            o, w = attention_with_weights(q[:, :, c0:c1], k_all, v_all, vis | pad_self)
            outs.append(o)
            w = w.mean(2)  # (B, H, c, S): the group's query heads averaged
            col_sum += (w * valid_q[:, None, c0:c1, None]).sum(2)
            in_chunk = (last_q >= c0) & (last_q < c1)
            picked = w.gather(2, (last_q - c0).clamp(0, c1 - c0 - 1)[:, None, None, None].expand(B, H, 1, S))[:, :, 0]
            last_w = torch.where(in_chunk[:, None, None], picked, last_w)
        out = torch.cat(outs, dim=2)

        if policy.name == "h2o":
            score = torch.cat([self.score[..., :L], torch.zeros(B, H, n, device=dev)], dim=-1) + col_sum
        elif policy.name == "tova":
            score = last_w
        else:
            score = torch.zeros(B, H, S, device=dev)
        seen = pos + n_valid
        keep = keep_mask(policy, kpos, klive, score, seen - 1, policy.budget(seen))
        count = keep.sum(-1)
        # pack the kept tokens into slots [0, count) in position order
        order = torch.sort(
            torch.where(keep, kpos, torch.full_like(kpos, torch.iinfo(torch.long).max)), dim=-1, stable=True
        ).indices
        m = min(S, C)
        order = order[..., :m]
        self.k[:, :, :m].copy_(k_all.gather(2, order[..., None].expand(B, H, m, D)).to(self.k.dtype))
        self.v[:, :, :m].copy_(v_all.gather(2, order[..., None].expand(B, H, m, D)).to(self.v.dtype))
        live = torch.arange(m, device=dev)[None, None] < count[..., None]
        self.slot_pos[..., :m].copy_(torch.where(live, kpos.gather(2, order), torch.full_like(order, -1)))
        self.score[..., :m].copy_(torch.where(live, score.gather(2, order), torch.zeros_like(score[..., :m])))
        self.length.copy_(count)
        return out

    def decode_with_policy(self, policy: EvictionPolicy, q, k_new, v_new, pos, n: int):
        """One token per row at position pos (B,): attend over live slots [0, n) plus the new token,
        update the scores, evict one token if over budget, write the new K/V into the freed slot (or
        slot `length`). q (B, Hq, 1, D), k_new/v_new (B, H, 1, D). Returns (B, Hq, 1, D)."""
        B, H = self.length.shape
        dev = q.device
        old_live = torch.arange(n, device=dev)[None, None] < self.length[..., None]  # (B, H, n)
        live = torch.cat([old_live, torch.ones(B, H, 1, dtype=torch.bool, device=dev)], dim=-1)
        k_all = torch.cat([self.k[:, :, :n].to(k_new.dtype), k_new], dim=2)
        v_all = torch.cat([self.v[:, :, :n].to(v_new.dtype), v_new], dim=2)
        out, w = attention_with_weights(q, k_all, v_all, live[:, :, None, :])
        w = w.mean(2)[:, :, 0]  # (B, H, n + 1)
        if policy.name == "h2o":
            old_score = self.score[..., :n] + w[..., :n]
        elif policy.name == "tova":
            old_score = w[..., :n]
        else:
            old_score = self.score[..., :n]
        new_score = w[..., n]
        budget = policy.budget(pos + 1)
        evict = (self.length + 1) > budget[:, None]
        victim = victim_slot(policy, self.slot_pos[..., :n], old_live, old_score, pos, budget)
        slot = torch.where(evict, victim, self.length).clamp(max=self.capacity)
        self.overflow |= (~evict & (self.length >= self.capacity)).any()
        self.score[..., :n].copy_(old_score)
        b = torch.arange(B, device=dev)[:, None].expand(B, H)
        h = torch.arange(H, device=dev)[None, :].expand(B, H)
        self.k.index_put_((b, h, slot), k_new[:, :, 0].to(self.k.dtype))
        self.v.index_put_((b, h, slot), v_new[:, :, 0].to(self.v.dtype))
        self.slot_pos.index_put_((b, h, slot), pos[:, None].expand(B, H))
        self.score.index_put_((b, h, slot), new_score)
        self.length.add_((~evict).long()).clamp_(max=self.capacity)
        return out


class PolicyState(CacheState):
    """The policy caches of all layers plus each row's next position, with the same accounting as the
    DMS state (CacheState: kv_bytes, compression), so policies and DMS are measured by the same code."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        policy: EvictionPolicy,
        max_seq_len: Optional[int] = None,
        dtype=None,
        device=None,
    ):
        p = next(model.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        max_seq_len = max_seq_len or model.max_seq_len
        attn0 = model.layers[0].attn
        capacity = policy.capacity(max_seq_len)
        caches = [
            PolicyKVCache(batch_size, attn0.num_kv_heads, attn0.head_dim, capacity, dtype, device) for _ in model.layers
        ]
        super().__init__(caches, batch_size, max_seq_len, dtype, device, eviction=True, window=0)
        self.policy = policy


# ============================================================================ model passes
@torch.no_grad()
def prefill_with_policy(
    model: nn.Module,
    tokens: torch.Tensor,
    state: PolicyState,
    lengths: Optional[torch.Tensor] = None,
    all_logits: bool = False,
) -> torch.Tensor:
    """Append tokens (B, n) (right-padded; `lengths` real tokens per row) with exact attention, then
    apply the policy's budget. Returns each row's last real logits (B, vocab), or (B, n, vocab)."""
    B, n = tokens.shape
    lengths, pos, input_pos = prefill_positions(tokens, state, lengths)

    def attend(i, q, k, v, _):
        return state.caches[i].append_with_policy(state.policy, q, k, v, pos, lengths)

    x = run_layers(model, model.tok_embeddings(tokens), input_pos, None, attend)
    state.next_pos.add_(lengths)
    h = model.norm(x)
    if all_logits:
        return model.output(h)
    last = (lengths - 1).clamp_min(0)
    return model.output(h[torch.arange(B, device=h.device), last])


@torch.no_grad()
def decode_step_with_policy(model: nn.Module, token: torch.Tensor, state: PolicyState) -> torch.Tensor:
    """One token per row: token (B, 1) at position state.next_pos. Returns logits (B, vocab)."""
    pos = state.next_pos
    # every layer holds the same count per (row, head) (the budget does not depend on the layer):
    # one host read of the used slot prefix serves all layers
    n = max(int(state.caches[0].length.max()), 1)

    def attend(i, q, k, v, _):
        return state.caches[i].decode_with_policy(state.policy, q, k, v, pos, n)

    x = run_layers(model, model.tok_embeddings(token), pos[:, None], None, attend)
    state.next_pos.add_(1)
    return model.output(model.norm(x))[:, -1]
