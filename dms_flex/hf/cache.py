"""The DMS KV cache for transformers' `generate()` and forward.

`DMSCache` is a `transformers.Cache` whose layers (`DMSCacheLayer`) each own one
`dms_flex.cache.DMSKVCache` (allocated at the first forward) and each row's next RoPE position. New
tokens go through `DMSKVCache.append` (each row's real tokens packed to the front first, as append
expects right padding, and the outputs unpacked); single tokens through `DMSKVCache.decode_update`
and the decode attention of `dms_flex.cache`.

Two ways to size it:
- growable (the default): slots are grown by doubling when the live tokens need more; a host-side
  bound of the longest live length decides when, so the decode step cannot be compiled;
- fixed (`DMSCache(model, capacity=N)`): N slots per (row, KV head), never grown. Every decode-step
  input then keeps its shape and address (the buffers are marked static, the token counter is a
  device tensor, as transformers' StaticCache does), so the cache is `is_compileable` and
  `generate()` compiles its decode forward by itself on CUDA (transformers' auto-compile, CUDA
  graphs included). A prefill that does not fit raises; a decode step that would not fit writes to
  the scratch slot and raises the sticky overflow flag, which the cache checks at every step
  outside the compiled forward (`get_mask_sizes`, called by generate's input preparation) and
  `generate()` checks once more when it returns (`dms_flex.hf.model`).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import decisions, stats
from ..cache import CacheOverflowError, DMSKVCache, default_decode_attention

__all__ = ["DMSCache", "DMSCacheLayer", "pack_order"]


def pack_order(live: torch.Tensor) -> torch.Tensor:
    """(B, n) permutation putting each row's real tokens first, in order."""
    return torch.sort((~live).to(torch.int8), dim=1, stable=True).indices


class DMSCacheLayer(CacheLayerMixin):
    """One layer of a DMSCache: a `dms_flex.cache.DMSKVCache` (created at the first forward; grown by
    doubling when the live tokens need more slots, or fixed at `capacity` slots) plus each row's next
    position."""

    is_croppable = False
    is_sliding = False

    def __init__(self, window: int, initial_capacity: Optional[int] = None, capacity: Optional[int] = None):
        super().__init__()
        self.window = window
        self.initial_capacity = initial_capacity
        self.fixed_capacity = capacity
        self.kv: Optional[DMSKVCache] = None
        self.next_pos: Optional[torch.Tensor] = None  # (B,) live tokens seen per row
        # columns (tokens, padding included) processed: what generate() slices inputs by. An int, or with a
        # fixed capacity a 0-d device tensor (a Python int changing every step would recompile the step)
        self.seen = 0
        self._bound = 0  # host-side upper bound of the longest live length (growable: no sync per decode step)

    # --- transformers' CacheLayerMixin protocol
    @property
    def is_compileable(self) -> bool:
        """A fixed capacity keeps every decode-step input's shape and address: transformers may compile."""
        return self.fixed_capacity is not None

    @property
    def keys(self):
        return None if self.kv is None else self.kv.keys

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("DMSCacheLayer keys are owned by its DMSKVCache")

    @property
    def values(self):
        return None if self.kv is None else self.kv.values

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("DMSCacheLayer values are owned by its DMSKVCache")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        capacity = self.fixed_capacity or max(1, self.initial_capacity or 64)
        self.kv = DMSKVCache(B, H, D, capacity, self.window, dtype=key_states.dtype, device=key_states.device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=key_states.device)
        if self.is_compileable:
            self.seen = torch.zeros((), dtype=torch.long, device=key_states.device)
            self._mark_static()
        self.device = key_states.device
        self.is_initialized = True

    def _mark_static(self) -> None:
        """Tell torch.compile that the buffers the decode step updates in place keep their addresses
        (CUDA graphs then read and write them where they are, as for transformers' StaticCache)."""
        for _, buf in self.kv.named_buffers(recurse=False):
            if buf is not None:
                torch._dynamo.mark_static_address(buf)
        torch._dynamo.mark_static_address(self.next_pos)
        torch._dynamo.mark_static_address(self.seen)

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "a DMSCache is filled by DMS attention (dms_flex.hf), not by cache.update(): this "
            "attention module is not DMS-enabled (call dms_flex.hf.enable_dms on the model)"
        )

    def get_mask_sizes(self, query_length: int):
        if self.is_compileable:  # DMS attention reads no mask of these sizes: a constant keeps the step's graph
            return self.fixed_capacity + query_length, 0
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()
            self.next_pos.zero_()
        if isinstance(self.seen, torch.Tensor):
            self.seen.zero_()
        else:
            self.seen = 0
        self._bound = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "a DMS cache cannot be cropped: evicted tokens are gone (assisted / speculative "
            "decoding and contrastive search are not supported)"
        )

    def offload(self):
        raise NotImplementedError("DMS caches do not support offloading")

    def prefetch(self):
        raise NotImplementedError("DMS caches do not support offloading")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv is not None:
            indices = indices.to(self.kv.k.device)
            self._map_rows(lambda t: t.index_select(0, indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_rows(self, fn) -> None:
        """Apply a row map (beam reordering, repetition) to every batch-first buffer: in place where the
        batch size stays (a compiled step's static buffers keep their addresses), else new buffers."""
        bufs = [(self.kv, name, buf) for name, buf in self.kv.named_buffers(recurse=False)]
        bufs.append((self, "next_pos", self.next_pos))
        for owner, name, buf in bufs:
            if buf is None or buf.dim() == 0:  # the scalar overflow flag, absent int8 scales
                continue
            new = fn(buf)
            if new.shape == buf.shape:
                buf.copy_(new)
            else:
                setattr(owner, name, new.contiguous())
        if self.is_compileable:
            self._mark_static()

    # --- DMS
    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.capacity

    def live_lengths(self) -> torch.Tensor:
        """(B, Hkv) tokens held per row and KV head."""
        return self.kv.length.clone()

    def _ensure(self, k: torch.Tensor) -> None:
        if self.kv is None:
            self.lazy_initialization(k, k)
        if k.shape[0] != self.kv.k.shape[0] or k.shape[1] != self.kv.k.shape[1]:
            raise ValueError(
                f"this DMSCache holds batch {self.kv.k.shape[0]} x {self.kv.k.shape[1]} KV heads, the "
                f"input has {k.shape[0]} x {k.shape[1]}: use a new DMSCache for a new batch"
            )

    def _grow(self, needed: int) -> None:
        """Re-allocate with at least `needed` slots (doubling); live slots, ring and marks are kept.
        Relies on DMSKVCache's layout: slot `capacity` is the scratch slot, win_slot == capacity
        means "no slot", slot_pos == -1 marks a dead slot."""
        old = self.kv
        C = old.capacity
        C2 = max(needed, 2 * C)
        C2 = -(-C2 // 64) * 64
        B, H, _, D = old.k.shape
        new = DMSKVCache(B, H, D, C2, self.window, dtype=old.k.dtype, device=old.k.device)
        with torch.no_grad():
            new.k[:, :, :C].copy_(old.k[:, :, :C])
            new.v[:, :, :C].copy_(old.v[:, :, :C])
            new.length.copy_(old.length)
            new.slot_pos[..., :C].copy_(old.slot_pos[..., :C])
            new.slot_marked[..., :C].copy_(old.slot_marked[..., :C])
            new.win_slot.copy_(torch.where(old.win_slot == C, torch.full_like(old.win_slot, C2), old.win_slot))
            new.overflow.copy_(old.overflow)
        self.kv = new

    def append(self, q, k, v, logits, live, scale) -> torch.Tensor:
        """n new tokens (padding anywhere, `live` (B, n) bool or None): exact DMS attention over the
        live cache plus themselves, then survivors are packed. Returns (B, Hq, n, D)."""
        self._ensure(k)
        B, H, n, D = k.shape
        order = None
        if live is None:
            n_valid = torch.full((B,), n, dtype=torch.long, device=k.device)
        else:
            order = pack_order(live)
            q = q.gather(2, order[:, None, :, None].expand_as(q))
            k = k.gather(2, order[:, None, :, None].expand_as(k))
            v = v.gather(2, order[:, None, :, None].expand_as(v))
            if logits is not None:  # None: eviction off, nothing is ever marked
                logits = logits.gather(2, order[:, None, :].expand_as(logits))
            n_valid = live.sum(1)
        if not self.is_compileable:
            needed = int(self.kv.length.max()) + n
            if needed > self.kv.capacity:
                self._grow(needed)
        try:  # a fixed cache takes more new tokens than slots when what DMS keeps of them fits
            out = self.kv.append(q, k, v, logits, self.next_pos, n_valid, scale=scale)
        except CacheOverflowError:
            if not self.is_compileable:
                raise
            raise CacheOverflowError(
                f"this DMSCache's fixed capacity of {self.kv.capacity} slots per batch row and KV head is too small "
                f"for this input: what DMS keeps of the {n} new tokens and the live ones does not fit (nothing was "
                f"written). Make the cache with a larger capacity (prompt length + max_new_tokens never overflows; "
                f"calibrated_capacities() with more headroom), or without one (it then grows, and decoding is not "
                f"compiled)"
            ) from None
        if order is not None:
            inv = torch.argsort(order, dim=1)
            out = out.gather(2, inv[:, None, :, None].expand_as(out))
        self.next_pos += n_valid
        self.seen += n  # in place where it is a tensor (fixed capacity)
        if not self.is_compileable:
            self._bound = int(self.kv.length.max())
        return out

    def decode(self, q, k, v, logits, scale) -> torch.Tensor:
        """One real token per row: `DMSKVCache.decode_update` (slot reuse, no compaction) and attention
        over the live slots. No host sync unless a growable cache's slots may run out; a fixed one raises
        its overflow flag instead (checked by `DMSCache.check_overflow`)."""
        if not self.is_compileable and self._bound + 1 > self.kv.capacity:
            self._bound = int(self.kv.length.max())
            if self._bound + 1 > self.kv.capacity:
                self._grow(self._bound + 1)
        if logits is None:
            evict_prev = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)
        else:
            evict_prev = decisions.hard_evict(logits[..., 0])
        self.kv.decode_update(k, v, evict_prev, self.next_pos)
        out = default_decode_attention(q.device)(q, self.kv, scale)
        self.next_pos += 1
        self.seen += 1  # a tensor in place with a fixed capacity: nothing on the host changes from step to step
        if not self.is_compileable:
            self._bound += 1
        return out


class DMSCache(Cache):
    """The DMS KV cache for transformers' `generate()` / forward: one DMSKVCache per layer.

    `DMSCache(model)`; pass it to generate() as `cache=` (transformers 5.24; `past_key_values=` there
    is the deprecated name, and the only one in earlier 5.x releases such as 5.17) and pass it again
    with the extended sequence to continue a conversation.
    generate() creates one by itself when none is passed.

    initial_capacity: slots per (row, KV head) allocated at the first forward of a growable cache
    (default: enough for the prompt); it grows by doubling.
    capacity: a fixed number of slots per (row, KV head) instead, one for every layer or one per
    layer, never grown: the cache is then compileable, and generate() compiles its decode steps on
    CUDA as it does for a StaticCache (`generation_config.disable_compile=True` turns that off).
    `capacity = prompt length + max_new_tokens` can never run out. DMS keeps fewer tokens, but not
    evenly: in some layers a head keeps nearly everything, so one number for all layers saves little;
    per-layer capacities from sample text (`calibrated_capacities`) do. A cache too small for its
    input raises `dms_flex.cache.CacheOverflowError` rather than drop a live token.
    """

    def __init__(self, model: nn.Module, initial_capacity: Optional[int] = None, *, capacity=None):
        runtime = getattr(model, "_dms_runtime", None)
        if runtime is None:
            raise ValueError("DMSCache(model) needs a DMS model (dms_flex.hf.enable_dms / from_pretrained)")
        if capacity is not None and initial_capacity is not None:
            raise ValueError(
                "DMSCache takes initial_capacity (a growable cache) or capacity (a fixed, compileable one), not both"
            )
        n_layers = model.config.num_hidden_layers
        listed = isinstance(capacity, (list, tuple))
        caps = list(capacity) if listed else [capacity] * n_layers  # a bad single value is named below
        if len(caps) != n_layers:
            raise ValueError(f"DMSCache capacity has {len(caps)} entries; the model has {n_layers} layers (one each)")
        for name, value in [("initial_capacity", initial_capacity)] + [("capacity", c) for c in caps]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DMSCache {name} must be a positive number of slots, got {value!r}")
        window = runtime.config.effective_window
        super().__init__(layers=[DMSCacheLayer(window, initial_capacity, c) for c in caps])

    def calibrated_capacities(self, max_len: int, headroom: float = 1.5) -> List[int]:
        """Per-layer capacities for prompts + new tokens of up to `max_len` tokens, from what this cache
        kept of sample text (run generate() or a forward over samples like the workload first, every row
        unpadded and of one length): per layer, the window plus `headroom` x the largest kept fraction of
        the older tokens, scaled to max_len (the rule of `dms_flex.torchtune_model.layer_capacities`;
        benchmarks/RESULTS.md section 24f: headroom 1.5 over 8 calibration windows held 8 others).
        Pass the result as `DMSCache(model, capacity=...)`."""
        from ..torchtune_model import capacities_from_fullest

        if self.layers[0].kv is None:
            raise ValueError("calibrated_capacities() reads what the cache kept: run the model over sample text first")
        seen = self.tokens_seen()
        if bool((seen != seen[0]).any()):
            raise ValueError("calibrated_capacities() needs rows that have all seen the same number of tokens")
        fullest = torch.stack([layer.kv.length.max() for layer in self.layers]).tolist()
        return capacities_from_fullest(fullest, int(seen[0]), self.window, max_len, headroom)

    def check_overflow(self) -> None:
        """Raise `dms_flex.cache.CacheOverflowError` if a decode step of a fixed-capacity cache ran out of
        slots (one host sync; a growable cache never overflows)."""
        fixed = [(i, layer) for i, layer in enumerate(self.layers) if layer.kv is not None and layer.is_compileable]
        if not fixed:
            return
        flags = torch.stack([layer.kv.overflow for _, layer in fixed]).tolist()  # one host sync
        full = [(i, layer.fixed_capacity) for (i, layer), flag in zip(fixed, flags) if flag]
        if full:
            i, cap = full[0]
            raise CacheOverflowError(
                f"this DMSCache ran out of slots during decoding (layer {i}: fixed capacity {cap} per batch row "
                f"and KV head; {len(full)} layer(s) in all); no live token was overwritten, but the tokens from "
                f"that step on are not exact. Make the cache with a larger capacity (prompt length + "
                f"max_new_tokens never overflows; calibrated_capacities() with more headroom), or without one "
                f"(it then grows, and decoding is not compiled)"
            )

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        # generate() calls this before every step, outside the compiled forward: the place to check that
        # the previous step had a slot (an eager call only: a compiled graph cannot sync with the host)
        if not torch.compiler.is_compiling() and self.layers[0].is_compileable:
            self.check_overflow()
        return super().get_mask_sizes(query_length, *args, **kwargs)

    @property
    def window(self) -> int:
        return self.layers[0].window

    def positions_for(self, batch: int, n: int, live: Optional[torch.Tensor], device) -> torch.Tensor:
        """(B, n) RoPE positions of n new tokens: each row continues from its live-token count."""
        start = self.layers[0].next_pos
        if start is None:
            start = torch.zeros(batch, dtype=torch.long, device=device)
        start = start.to(device)
        if start.shape[0] != batch:
            raise ValueError(
                f"this DMSCache holds batch {start.shape[0]}, the input has batch {batch}: use a new "
                f"DMSCache for a new batch"
            )
        if live is None:
            return start[:, None] + torch.arange(n, device=device)[None]
        return start[:, None] + (live.long().cumsum(1) - 1).clamp_min(0)

    def live_lengths(self) -> List[torch.Tensor]:
        """Per layer, (B, Hkv) tokens held."""
        return [layer.live_lengths() for layer in self.layers]

    def tokens_seen(self) -> torch.Tensor:
        """(B,) real tokens seen per row (the cached ones plus the evicted ones)."""
        return self.layers[0].next_pos.clone()

    def compression(self) -> stats.CompressionReport:
        """Kept fraction per layer and KV head, averaged over rows; `.ratio` is the compression ratio."""
        seen = self.tokens_seen().clamp_min(1)[:, None].float()
        return stats.compression_report([layer.kv.length.float() / seen for layer in self.layers])

    def kv_bytes(self) -> dict:
        """Live KV bytes vs a dense cache holding the same tokens, and bytes allocated."""
        kv0 = self.layers[0].kv
        per_slot = 2 * kv0.k.shape[-1] * kv0.k.element_size()
        live = sum(int(layer.kv.length.sum()) for layer in self.layers) * per_slot
        dense = int(self.tokens_seen().sum()) * kv0.k.shape[1] * len(self.layers) * per_slot
        allocated = sum(2 * layer.kv.k.numel() * layer.kv.k.element_size() for layer in self.layers)
        return {"live": live, "dense": dense, "allocated": allocated}
