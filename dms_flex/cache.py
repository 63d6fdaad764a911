"""The compacting static KV cache of DMS inference (one module per layer).

Each (batch row, KV head) is its own variable-length sequence stored in fixed slots:
- live slots are always [0, length): a slot is freed only when the token that takes it arrives,
  so decode never compacts and never leaves holes;
- the last window+1 tokens are remembered in a ring (`win_slot`, indexed by position % (w+1)),
  with their eviction marks in `slot_marked`;
- decode (one token): the new token's decision marks its predecessor; the token leaving the window
  (position p-w-1) frees its slot if marked, and the new token's K/V goes there, else into slot
  `length`. One K/V write per step, no host sync, static shapes: CUDA-graph capturable;
- append (prefill, or a later user turn): exact DMS attention of the new tokens over the live
  slots plus themselves, then survivors are packed (one gather; prefill may copy, decode never).

Slot `capacity` is a scratch slot: a decode step that would overflow writes there and raises the
sticky `overflow` flag instead of overwriting a live token; `check_overflow()` turns it into an
error at the next host sync.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import decisions, masks
from .kernels.reference import decode_attention_dense, masked_attention
from .quant import dequantize_kv, quantize_kv


class CacheOverflowError(RuntimeError):
    pass


def capacity_bucket(n: int, base: int = 256) -> int:
    """The size a growing cache (capacity="auto") takes for n slots: the smallest of base x (1, 1.5, 2, 3, 4,
    6, 8, ...) that holds n (256, 384, 512, 768, 1024, ... for the default base). Few distinct sizes, because
    every new size is a new shape for a compiled decode step (a recompile, and torch.compile stops
    recompiling a function after 8 by default); at most a third of a size is unused for lack of need."""
    size, step = max(1, int(base)), 0
    while size < n:
        size = size * 3 // 2 if step % 2 == 0 else size * 4 // 3
        step += 1
    return size


class SlotStore(nn.Module):
    """K/V slots per (batch row, KV head): live slots [0, length) with their positions, plus the
    scratch slot `capacity` and a sticky overflow flag. The store and its accounting are shared by
    the DMS cache below and the training-free baselines' caches (eval/baselines.py)."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype=torch.bfloat16,
        device=None,
        kv_dtype=None,
    ):
        """kv_dtype=torch.int8 stores K/V as int8 with one float32 scale per (row, KV head, token)."""
        super().__init__()
        if capacity < 1:
            raise ValueError(f"cache capacity={capacity} must be >= 1 slot")
        if kv_dtype not in (None, torch.int8):
            raise ValueError(f"kv_dtype={kv_dtype} is not supported: use None (the model dtype) or torch.int8")
        self.capacity = capacity
        B, H, C = batch_size, num_kv_heads, capacity
        store = kv_dtype or dtype
        self.register_buffer("k", torch.zeros(B, H, C + 1, head_dim, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, H, C + 1, head_dim, dtype=store, device=device), persistent=False)
        scales = kv_dtype is not None
        for name in ("k_scale", "v_scale"):
            self.register_buffer(name, torch.zeros(B, H, C + 1, device=device) if scales else None, persistent=False)
        self.register_buffer("length", torch.zeros(B, H, dtype=torch.long, device=device), persistent=False)
        self.register_buffer(
            "slot_pos", torch.full((B, H, C + 1), -1, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("overflow", torch.zeros((), dtype=torch.bool, device=device), persistent=False)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def bytes_per_slot(self) -> int:
        """K and V bytes of one (row, KV head, token) slot, scales included."""
        per = self.k.shape[-1] * self.k.element_size()
        return 2 * (per + (4 if self.quantized else 0))

    def _read(self, n: int, dtype):
        """The first n slots as attention reads them (dequantized when int8): prefill/reference only."""
        k, v = self.k[:, :, :n], self.v[:, :, :n]
        if self.quantized:
            return dequantize_kv(k, self.k_scale[:, :, :n], dtype), dequantize_kv(v, self.v_scale[:, :, :n], dtype)
        return k.to(dtype), v.to(dtype)

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.capacity]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.capacity]

    def reset(self) -> None:
        self.length.zero_()
        self.slot_pos.fill_(-1)
        self.overflow.zero_()

    def check_overflow(self) -> None:
        if bool(self.overflow):
            raise CacheOverflowError(
                f"the DMS KV cache ran out of slots (capacity {self.capacity} per batch row and KV head); no "
                f"live token was overwritten, but generation cannot continue. Ask for a larger capacity "
                f"(e.g. cache_capacity=max_seq_len, the default that never overflows)."
            )


class DMSKVCache(SlotStore):
    """The slot store plus DMS's eviction marks and the ring of the last window+1 positions."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        window: int,
        dtype=torch.bfloat16,
        device=None,
        kv_dtype=None,
    ):
        super().__init__(batch_size, num_kv_heads, head_dim, capacity, dtype, device, kv_dtype)
        self.window = window
        B, H, C, W = batch_size, num_kv_heads, capacity, window + 1
        self.register_buffer("slot_marked", torch.zeros(B, H, C + 1, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("win_slot", torch.full((B, H, W), C, dtype=torch.long, device=device), persistent=False)
        # growth during prefill (InferenceState(capacity="auto")): up to this many slots, else fixed
        self.max_capacity: Optional[int] = None
        self.bucket_base = capacity  # capacity="auto": the sizes it grows through (`capacity_bucket`)
        self.resizes = 0  # how many times the buffers were re-allocated (a captured graph keys on it)

    def reset(self) -> None:
        super().reset()
        self.slot_marked.zero_()
        self.win_slot.fill_(self.capacity)

    def resize(self, capacity: int) -> None:
        """Re-allocate every buffer for `capacity` slots per (row, KV head), keeping every live slot (live
        slots are always [0, length): prefill packs them, a decode step refills the slot it frees). Never
        while a captured CUDA graph will still replay on the old buffers (generate_tokens re-captures)."""
        C = self.capacity
        need = int(self.length.max()) if self.length.numel() else 0
        if capacity < max(need, 1):
            raise ValueError(f"cache capacity={capacity} cannot hold the {need} live slots of a (row, KV head)")
        if capacity == C:
            return
        keep = min(C, capacity)

        def resized(buf, fill):
            new = buf.new_full(buf.shape[:2] + (capacity + 1,) + buf.shape[3:], fill)
            new[:, :, :keep].copy_(buf[:, :, :keep])
            return new

        # normal tensors even when called under torch.inference_mode (prefill): the cache is updated in place
        # outside it too (reset, an eager step)
        with torch.inference_mode(False), torch.no_grad():
            self.k, self.v = resized(self.k, 0), resized(self.v, 0)
            if self.quantized:
                self.k_scale, self.v_scale = resized(self.k_scale, 0), resized(self.v_scale, 0)
            self.slot_pos = resized(self.slot_pos, -1)
            self.slot_marked = resized(self.slot_marked, False)
            # the ring's empty entries point at the scratch slot, which moves from C to the new capacity
            self.win_slot = torch.where(self.win_slot == C, torch.full_like(self.win_slot, capacity), self.win_slot)
        self.capacity = capacity
        self.resizes += 1

    # ------------------------------------------------------------------ decode
    def decode_update(
        self, k_new: torch.Tensor, v_new: torch.Tensor, evict_prev: torch.Tensor, pos: torch.Tensor
    ) -> None:
        """k_new, v_new: (B, H, 1, D) for the token at position pos (B,); evict_prev (B, H) bool is
        this token's decision about token pos-1. On CUDA one fused Triton kernel does all of it
        (kernels/decode_update.py); the code below is its reference and the CPU path."""
        from .kernels import decode_update as fused

        if fused.supported(k_new):
            fused.decode_update(self, k_new, v_new, evict_prev, pos)
            return
        if k_new.device.type == "cpu" and not torch.compiler.is_compiling():
            self._decode_update_eager(k_new, v_new, evict_prev, pos)
            return
        self._decode_update_indexed(k_new, v_new, evict_prev, pos)

    def _decode_update_indexed(self, k_new, v_new, evict_prev, pos) -> None:
        """decode_update in static-shape tensor ops (index_put_ through `_write`): the reference of
        the fused kernel and of the eager CPU path below, and the compiled path."""
        B, H = self.length.shape
        W = self.window + 1
        C = self.capacity
        pos_bh = pos[:, None].expand(B, H)
        b = torch.arange(B, device=pos.device)[:, None].expand(B, H)
        h = torch.arange(H, device=pos.device)[None, :].expand(B, H)
        row = (b, h)  # every write below touches one slot per (batch row, KV head): see _write
        # 1. the new token decides its predecessor
        prev_slot = self.win_slot[b, h, (pos_bh - 1) % W]
        mark = torch.where(pos_bh >= 1, evict_prev, self.slot_marked[b, h, prev_slot])
        _write(self.slot_marked, row, prev_slot, mark)
        # 2. the token leaving the window (pos - w - 1) frees its slot if marked
        ring_idx = pos_bh % W
        old_slot = self.win_slot[b, h, ring_idx]
        freed = (
            (pos_bh >= W)
            & masks.is_far(pos_bh, self.slot_pos[b, h, old_slot], self.window)
            & self.slot_marked[b, h, old_slot]
        )
        new_slot = torch.where(freed, old_slot, self.length)
        self.overflow |= (new_slot >= C).any()
        slot = new_slot.clamp(max=C)
        self.length.copy_(torch.minimum(self.length + (~freed).long(), torch.full_like(self.length, C)))
        # 3. one K/V write and the bookkeeping of the new token
        if self.quantized:
            kq, ks = quantize_kv(k_new[:, :, 0])
            vq, vs = quantize_kv(v_new[:, :, 0])
            for buf, val in ((self.k, kq), (self.v, vq), (self.k_scale, ks), (self.v_scale, vs)):
                _write(buf, row, slot, val)
        else:
            _write(self.k, row, slot, k_new[:, :, 0])
            _write(self.v, row, slot, v_new[:, :, 0])
        _write(self.slot_pos, row, slot, pos_bh)
        _write(self.slot_marked, row, slot, torch.zeros_like(pos_bh, dtype=torch.bool))
        _write(self.win_slot, row, ring_idx, slot)

    def _decode_update_eager(self, k_new, v_new, evict_prev, pos) -> None:
        """decode_update on the CPU, eager: the same steps as `_decode_update_indexed` (bit for bit,
        tests/test_cache.py), in few ops, since a decode step runs this once per layer and each op's
        dispatch costs microseconds there. Each buffer is read and written through flat indices, one
        element per (row, KV head); the indices that depend only on the positions are built once per
        step for all layers (`_step_index`), and what the host knows cheaply on the CPU (rows before
        the first position or the window, the largest slot written) skips the ops it makes idle."""
        H = self.length.shape[1]
        C = self.capacity
        ix = _step_index(pos, H, self.window + 1, C + 1)
        marked, slot_pos, win = self.slot_marked.view(-1), self.slot_pos.view(-1), self.win_slot.view(-1)
        length = self.length.view(-1)
        # 1. the new token decides its predecessor
        prev = win.take(ix.ring_prev).add_(ix.slot_base)
        mark = evict_prev.reshape(-1)
        if not ix.all_have_prev:
            mark = torch.where(ix.has_prev, mark, marked.take(prev))
        marked.put_(prev, mark)
        # 2. the token leaving the window frees its slot if marked (only possible from position w+1 on)
        if ix.any_past_window:
            old = win.take(ix.ring_cur)
            at = old + ix.slot_base
            freed = masks.is_far(ix.pos_bh, slot_pos.take(at), self.window) & marked.take(at)
            if not ix.all_past_window:
                freed &= ix.past_window
            slot = torch.where(freed, old, length)
            grow = freed.logical_not()
        else:  # slot is `length` itself: read (below) before length grows
            slot, grow = length, None
        # a full cache writes to the scratch slot C and raises the sticky flag
        full = max(slot.tolist()) >= C
        if full:
            self.overflow.fill_(True)
            slot = slot.clamp(max=C)
        at = slot + ix.slot_base
        win.put_(ix.ring_cur, slot)
        length.add_(1 if grow is None else grow)
        if full:  # else no slot reached C, so no length passes it
            length.clamp_(max=C)
        # 3. one K/V write and the bookkeeping of the new token
        self._write_rows(k_new, v_new, at)
        slot_pos.put_(at, ix.pos_bh)
        marked.put_(at, ix.no_mark)

    def _write_rows(self, k_new, v_new, at) -> None:
        """K/V (B, H, 1, D) of the new token into the flat slots `at` (B*H,) of this layer's buffers
        (eager CPU decode: `_decode_update_eager` and `decode_stacked_begin`'s steps)."""
        B, H, _, D = k_new.shape
        k, v = k_new.reshape(B * H, D), v_new.reshape(B * H, D)
        if self.quantized:
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
            self.k_scale.view(-1).put_(at, ks)
            self.v_scale.view(-1).put_(at, vs)
        for buf, val in ((self.k, k), (self.v, v)):
            buf.view(-1, D).index_copy_(0, at, val if val.dtype == buf.dtype else val.to(buf.dtype))

    # ------------------------------------------------------------------ append (prefill / new turn)
    def append(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logits: Optional[torch.Tensor],
        pos: torch.Tensor,
        n_valid: torch.Tensor,
        attend=None,
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Attend n new tokens over the live cache plus themselves, then pack survivors.

        q: (B, Hq, n, D), k/v: (B, H, n, D) post-RoPE; logits: (B, H, n) raw decision logits of the
        new tokens (logit i decides token pos+i-1, so the first one decides the cached newest token),
        or None when eviction is off (nothing is ever marked); pos: (B,) position of the first new
        token; n_valid: (B,) real tokens per row (right padding).

        Attention (docs/design.md, "Prefill"): eviction off over an empty cache is SDPA causal; on
        CUDA everything else is one Triton kernel (kernels/prefill.py) that reads the live slots in
        place, so nothing (n x S) is built. Elsewhere (CPU, tiny heads) `attend(q, k_all, v_all,
        visible (B, H, n, S) bool)` runs the reference (default `masked_attention`).
        Nothing is written when the survivors would not fit (CacheOverflowError).
        """
        B, H, n, D = k.shape
        C, w = self.capacity, self.window
        dev = k.device
        j = torch.arange(n, device=dev)
        qpos = pos[:, None] + j[None]  # (B, n)
        valid_new = (j[None] < n_valid[:, None])[:, None, :].expand(B, H, n)
        L = int(self.length.max())  # the used prefix of the slots (one host sync: prefill is not graph-captured)
        marks, new_marked = self._marks(logits, pos, n_valid, valid_new, L)

        # survivors after each row's last real token
        last = (pos + n_valid - 1)[:, None, None]  # (B, 1, 1)
        live_cache = torch.arange(L, device=dev)[None, None] < self.length[..., None]  # (B, H, L)
        kpos = torch.cat([self.slot_pos[..., :L], qpos[:, None].expand(B, H, n)], dim=-1)  # (B, H, L + n)
        kmark = torch.cat([marks, new_marked], dim=-1)
        klive = torch.cat([live_cache, valid_new], dim=-1)
        survive = klive & ~(kmark & masks.is_far(last, kpos, w))
        count = survive.sum(-1)
        # the only host syncs: L above, and this check where an overflow is possible at all; the rest
        # (attention, pack) is queued without waiting
        if L + n > C and bool((count > C).any()):
            need = int(count.max())
            if self.max_capacity is not None and need <= self.max_capacity:  # capacity="auto": grow, in steps
                self.resize(min(self.max_capacity, capacity_bucket(max(need, C + 1), self.bucket_base)))
                return self.append(q, k, v, logits, pos, n_valid, attend=attend, scale=scale)
            raise CacheOverflowError(
                f"this input needs {int(count.max())} KV slots but the DMS cache holds {C} per batch row and KV "
                f"head; nothing was written. Create the cache with a larger capacity (the default, max_seq_len, "
                f"never overflows)."
            )
        if L > 0:
            self.slot_marked[..., :L].copy_(marks)

        if self.quantized:  # the new tokens are attended as the cache will hold them
            (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
            k, v = dequantize_kv(kq, ks, k.dtype), dequantize_kv(vq, vs, v.dtype)
        out = self._attend(q, k, v, new_marked, pos, L, logits is None, attend, scale, (klive, kpos, kmark, qpos))
        if self.quantized:
            new = [kq, vq, ks, vs]
        else:
            new = [k.to(self.k.dtype), v.to(self.v.dtype)]
        olds = [self.k, self.v, self.k_scale, self.v_scale]
        stored = [x if L == 0 else torch.cat([old[:, :, :L], x], dim=2) for x, old in zip(new, olds)]
        self._pack(survive, count, stored, kpos, kmark, last)
        return out

    def _marks(self, logits, pos, n_valid, valid_new, L: int):
        """(marks of the L used slots, marks of the n new tokens): chunk token t is marked by logit
        t+1 (if that token is real), the cached newest token (position pos - 1) by logit 0."""
        B, H, n = valid_new.shape
        marks = self.slot_marked[..., :L]
        new_marked = torch.zeros(B, H, n, dtype=torch.bool, device=valid_new.device)
        if logits is None:
            return marks, new_marked
        dec = decisions.hard_evict(logits)
        new_marked[..., :-1] = dec[..., 1:] & valid_new[..., 1:]
        if L > 0:
            marks = F.pad(marks, (0, 1))  # column L absorbs rows with no previous token
            has_prev = ((pos >= 1) & (n_valid >= 1))[:, None, None]
            prev = self.win_slot.gather(2, ((pos - 1) % (self.window + 1))[:, None, None].expand(B, H, 1))
            prev = torch.where(has_prev, prev.clamp(max=L), torch.full_like(prev, L))
            marks = marks.scatter(2, prev, dec[..., :1])[..., :L]
        return marks, new_marked

    def _attend(self, q, k, v, new_marked, pos, L: int, eviction_off: bool, attend, scale, keys):
        """The new tokens' attention (see append): SDPA causal, the Triton prefill kernel, or the
        reference over an explicit visibility mask built from keys = (klive, kpos, kmark, qpos)."""
        from .kernels import prefill as prefill_kernel

        if eviction_off and L == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        if prefill_kernel.supported(q):
            cache = self if L > 0 else None
            return prefill_kernel.prefill_attention(
                q, k, v, new_marked, self.window, pos0=pos, cache=cache, scale=scale
            )
        klive, kpos, kmark, qpos = keys
        n = q.shape[2]
        k_old, v_old = self._read(L, k.dtype)
        if attend is None and q.device.type == "cpu" and n >= 64 and not torch.compiler.is_compiling():
            from .kernels.prefill_cpu import blocked_prefill_attention  # by query blocks over the visible keys

            return blocked_prefill_attention(
                q,
                torch.cat([k_old, k], dim=2),
                torch.cat([v_old, v], dim=2),
                klive,
                kpos,
                kmark,
                qpos,
                self.length,
                L,
                self.window,
                scale,
            )
        vis = klive[:, :, None, :] & masks.visible(
            qpos[:, None, :, None], kpos[:, :, None, :], kmark[:, :, None, :], self.window
        )
        # padded queries see themselves only, so no row is empty
        pad_self = torch.eye(n, dtype=torch.bool, device=q.device)[None, None] & ~klive[..., L:, None]
        vis[..., L:] |= pad_self
        attend = attend or functools.partial(masked_attention, scale=scale)
        return attend(q, torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2), vis)

    def _pack(self, survive, count, stored, kpos, kmark, last):
        """Survivors of the (old slots + new tokens) sequence into slots [0, count), in order: one
        cumulative sum and one scatter give each slot its source, one gather per buffer moves them."""
        B, H, S = survive.shape
        W = self.window + 1
        dev = survive.device
        M = min(S, self.capacity)  # slots written (no host sync for the exact count); [count, M) are dead
        dst = torch.where(survive, survive.cumsum(-1) - 1, torch.full_like(kpos, M))
        order = torch.zeros(B, H, M + 1, dtype=torch.long, device=dev)
        order.scatter_(2, dst, torch.arange(S, device=dev).expand(B, H, S))
        order = order[..., :M]
        D = self.k.shape[-1]
        idx = order[..., None].expand(B, H, M, D)
        self.k[:, :, :M].copy_(stored[0].gather(2, idx))
        self.v[:, :, :M].copy_(stored[1].gather(2, idx))
        if self.quantized:
            self.k_scale[:, :, :M].copy_(stored[2].gather(2, order))
            self.v_scale[:, :, :M].copy_(stored[3].gather(2, order))
        live = torch.arange(M, device=dev)[None, None] < count[..., None]
        new_pos = torch.where(live, kpos.gather(2, order), torch.full_like(order, -1))
        self.slot_pos[..., :M].copy_(new_pos)
        self.slot_marked[..., :M].copy_(kmark.gather(2, order) & live)
        self.length.copy_(count)
        # the ring: slot of each token still inside the window of the last token
        in_win = live & ~masks.is_far(last, new_pos, self.window)
        ring = torch.where(in_win, new_pos % W, torch.full_like(new_pos, W))
        win = torch.full((B, H, W + 1), self.capacity, dtype=torch.long, device=dev)
        win.scatter_(2, ring, torch.arange(M, device=dev).expand(B, H, M))
        self.win_slot.copy_(win[..., :W])


def _write(buf: torch.Tensor, bh: tuple, idx: torch.Tensor, val: torch.Tensor) -> None:
    """buf[b, h, idx[b, h], ...] = val[b, h, ...] for every (b, h), in place. buf: (B, H, N, ...).

    Compiled: index_put_ on the buffer itself, which inductor keeps in place (a scatter_, or an
    index_copy_ through a flattened view, was functionalised into a copy of the whole buffer).
    Eager: linear indices into the flattened buffer (CPU index_put_ with (b, h, slot) index tensors
    is ~400x slower): put_ for one value per slot, index_copy_ for K/V rows (put_ is several times
    cheaper per call on the CPU, where a decode step pays each op's dispatch per layer).
    """
    b, h = bh
    if torch.compiler.is_compiling():
        buf.index_put_((b, h, idx), val.to(buf.dtype))
        return
    lin = ((b * buf.shape[1] + h) * buf.shape[2] + idx).reshape(-1)
    if val.dtype != buf.dtype:
        val = val.to(buf.dtype)
    if buf.dim() == 3:
        buf.put_(lin, val.reshape(-1))
    else:
        buf.view(-1, *buf.shape[3:]).index_copy_(0, lin, val.reshape(lin.numel(), *buf.shape[3:]))


class _StepIndex(NamedTuple):
    """What `DMSKVCache._decode_update_eager` needs of one step's positions, per (row, KV head) flat."""

    pos_bh: torch.Tensor  # (B*H,) each row's position
    ring_prev: torch.Tensor  # flat win_slot index of ring entry (pos - 1) % W
    ring_cur: torch.Tensor  # flat win_slot index of ring entry pos % W
    slot_base: torch.Tensor  # flat index of slot 0 in the slot buffers
    has_prev: torch.Tensor  # pos >= 1
    past_window: torch.Tensor  # pos >= W
    no_mark: torch.Tensor  # False
    all_have_prev: bool
    any_past_window: bool
    all_past_window: bool


_LAST_STEP: tuple = (None, None)  # (key, _StepIndex) of the latest step: every layer of a step shares it


def _step_index(pos: torch.Tensor, H: int, W: int, S: int) -> _StepIndex:
    """The indices of one decode step for caches of H KV heads, ring size W and S slots (scratch
    included): built from the host's copy of pos (free on the CPU) on the first layer of a step and
    reused by the others. Never written to."""
    global _LAST_STEP
    p = pos.tolist()
    key = (tuple(p), H, W, S, pos.device, torch.is_inference_mode_enabled())
    last_key, last_ix = _LAST_STEP  # one read: another thread may replace the pair at any time
    if last_key == key:
        return last_ix
    p_bh = [x for x in p for _ in range(H)]
    bh = range(len(p_bh))

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=pos.device)

    ix = _StepIndex(
        pos_bh=t(p_bh),
        ring_prev=t([i * W + (x - 1) % W for i, x in zip(bh, p_bh)]),
        ring_cur=t([i * W + x % W for i, x in zip(bh, p_bh)]),
        slot_base=t([i * S for i in bh]),
        has_prev=t([x >= 1 for x in p_bh], torch.bool),
        past_window=t([x >= W for x in p_bh], torch.bool),
        no_mark=t([False] * len(p_bh), torch.bool),
        all_have_prev=all(x >= 1 for x in p),
        any_past_window=any(x >= W for x in p),
        all_past_window=all(x >= W for x in p),
    )
    _LAST_STEP = (key, ix)  # replaced whole (atomic), never mutated
    return ix


class StackedBookkeeping(NamedTuple):
    """The bookkeeping buffers of every layer's DMSKVCache as one tensor each, leading dimension the layer:
    each cache's own buffers are views of these (`stack_bookkeeping`), so a decode step can free and
    assign the slots of all layers in one set of ops (`decode_stacked_begin`) instead of one per layer."""

    length: torch.Tensor  # (L, B, H)
    slot_pos: torch.Tensor  # (L, B, H, S), S = capacity + 1
    slot_marked: torch.Tensor  # (L, B, H, S)
    win_slot: torch.Tensor  # (L, B, H, W), W = window + 1
    views: tuple  # per layer, the view objects each cache's buffers must still be (see `current`)

    _NAMES = ("length", "slot_pos", "slot_marked", "win_slot")

    def current(self, caches) -> bool:
        """Do the caches still hold these views? (A `.to()` or deepcopy of one cache, or a buffer assigned
        anew, replaces them: the step then takes the per-layer path.)"""
        if len(caches) != len(self.views):
            return False
        for c, views in zip(caches, self.views):
            b = c._buffers
            if any(b[name] is not view for name, view in zip(self._NAMES, views)):
                return False
        return True


def stack_bookkeeping(caches) -> Optional[StackedBookkeeping]:
    """Move the bookkeeping buffers (length, slot_pos, slot_marked, win_slot) of DMS caches of one shape,
    window and device into stacked tensors and make each cache's buffers views of them, values kept.
    Returns None (nothing changed) when the caches differ in any of those."""
    if not caches or not all(isinstance(c, DMSKVCache) for c in caches):
        return None
    c0 = caches[0]
    key = (c0.window, c0.capacity, c0.win_slot.shape, c0.slot_pos.shape, c0.length.device)
    if any((c.window, c.capacity, c.win_slot.shape, c.slot_pos.shape, c.length.device) != key for c in caches):
        return None
    stacked = [torch.stack([getattr(c, name) for c in caches]) for name in StackedBookkeeping._NAMES]
    views = []
    for i, c in enumerate(caches):
        mine = tuple(t[i] for t in stacked)
        for name, view in zip(StackedBookkeeping._NAMES, mine):
            c._buffers[name] = view
        views.append(mine)
    return StackedBookkeeping(*stacked, views=tuple(views))


class StackedStep(NamedTuple):
    """What `decode_stacked_begin` leaves for the rest of one decode step, per layer i."""

    kv_rows: tuple  # kv_rows[i] (B*H,): the slot of the new token as a row of layer i's (B*H*S, D) K/V
    lengths: list  # lengths[i]: the B*H lengths of layer i after the write (host)
    dead: tuple  # dead[i] (B*H, 1, n): True at the slots of layer i past each length, n the longest of any layer
    prev: torch.Tensor  # (L*B*H,) flat slot_marked index of each predecessor (position pos - 1)


class _StackedIndex(NamedTuple):
    """The position-independent flat indices of `decode_stacked_begin`, per (layer, row, KV head)."""

    ring_base: torch.Tensor  # index of ring entry 0 in the flat win_slot
    slot_base: torch.Tensor  # index of slot 0 in the flat slot buffers
    kv_base: torch.Tensor  # index of slot 0 in one layer's flat K/V rows
    row: torch.Tensor  # the batch row
    no_mark: torch.Tensor  # False


@functools.lru_cache(maxsize=8)
def _stacked_index(L: int, B: int, H: int, W: int, S: int, device, inference: bool) -> _StackedIndex:
    n = torch.arange(L * B * H, device=device)
    return _StackedIndex(
        n * W, n * S, n % (B * H) * S, n // H % B, torch.zeros(L * B * H, dtype=torch.bool, device=device)
    )


def decode_stacked_begin(stack: StackedBookkeeping, window: int, pos: torch.Tensor) -> Optional[StackedStep]:
    """The bookkeeping of one decode step for every layer at once, on the CPU: the token at position pos (B,)
    frees the slot of the token leaving the window if that one is marked, else takes slot `length`; its
    slot, position, cleared mark and ring entry are written for all layers. Left to the caller: each
    layer's K/V into `kv_rows[i]` (`DMSKVCache._write_rows`), and after the layer loop the marks of the
    predecessors (`decode_stacked_end`). The same updates as `DMSKVCache._decode_update_indexed` per layer
    (tests/test_cache.py holds them bit-identical): none of them depends on the layer loop, since with
    window >= 1 the token leaving the window is not the predecessor this step marks, and the predecessor's
    live slot is neither the freed one nor slot `length`.

    Returns None, having written nothing, where that argument needs more (window 0, a row at position 0,
    a predecessor in the scratch slot after an overflow) or the step would overflow: the caller then runs
    the per-layer `decode_update`, which handles those.
    """
    L, B, H = stack.length.shape
    S, W = stack.slot_pos.shape[-1], stack.win_slot.shape[-1]
    C = S - 1
    p = pos.tolist()
    if window < 1 or min(p) < 1:
        return None
    ix = _stacked_index(L, B, H, W, S, pos.device, torch.is_inference_mode_enabled())
    per_row = torch.tensor([(x - 1) % W for x in p] + [x % W for x in p] + p, device=pos.device)
    ring_prev = per_row.take(ix.row).add_(ix.ring_base)
    ring_cur = per_row.take(ix.row + B).add_(ix.ring_base)
    pos_n = per_row.take(ix.row + 2 * B)
    win, slot_pos, marked = stack.win_slot.view(-1), stack.slot_pos.view(-1), stack.slot_marked.view(-1)
    length = stack.length.view(-1)
    prev_slot = win.take(ring_prev)
    old = win.take(ring_cur)
    at_old = old + ix.slot_base
    freed = masks.is_far(pos_n, slot_pos.take(at_old), window) & marked.take(at_old)
    if min(p) < W:
        freed &= pos_n >= W
    slot = torch.where(freed, old, length)
    if max(torch.cat([prev_slot, slot]).tolist()) >= C:
        return None  # a predecessor in the scratch slot, or this step overflows
    at = slot + ix.slot_base
    win.put_(ring_cur, slot)
    length.add_(freed.logical_not())
    slot_pos.put_(at, pos_n)
    marked.put_(at, ix.no_mark)
    lengths = stack.length.view(L, B * H).tolist()
    n = max(1, max(max(row) for row in lengths))
    return StackedStep(
        kv_rows=slot.add_(ix.kv_base).view(L, B * H).unbind(0),
        lengths=lengths,
        dead=(torch.arange(n, device=pos.device) >= stack.length.view(L, B * H, 1, 1)).unbind(0),
        prev=prev_slot.add_(ix.slot_base),
    )


def decode_stacked_end(stack: StackedBookkeeping, step: StackedStep, evict_prev: Optional[torch.Tensor]) -> None:
    """The predecessors' marks of a step begun by `decode_stacked_begin`: evict_prev (L, B, H) bool, each
    layer's decision about the token at pos - 1 (None: eviction off, nothing marked)."""
    marked = stack.slot_marked.view(-1)
    if evict_prev is None:
        evict_prev = torch.zeros(step.prev.shape, dtype=torch.bool, device=step.prev.device)
    marked.put_(step.prev, evict_prev.reshape(-1))


def decode_attention_kernel(q: torch.Tensor, cache: DMSKVCache, scale: Optional[float] = None) -> torch.Tensor:
    """The Triton split-KV decode kernel over live slots (CUDA; other devices use its reference)."""
    from .kernels.decode import decode_attention

    # the whole buffers (scratch slot included), not a slice: lengths never exceed the capacity,
    # and a contiguous argument spares the compiled graph any layout copy of the cache
    out = decode_attention(
        q[:, :, 0], cache.k, cache.v, cache.length, scale, k_scale=cache.k_scale, v_scale=cache.v_scale
    )
    return out[:, :, None]


def default_decode_attention(device: torch.device):
    """The kernel on CUDA, the dense reference elsewhere."""
    return decode_attention_kernel if torch.device(device).type == "cuda" else decode_attention_dense
