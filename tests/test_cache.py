"""dms_flex.cache.DMSKVCache on its own, against plain-Python references on small shapes.

A sequence is described per (row, KV head) by `dec[p]`: the decision that the token at position p makes
about its predecessor p-1 (docs/design.md, "The shift"). Token t is therefore marked once token t+1 has
arrived, and at the last position `last` the cache must hold exactly the tokens `masks.visible(last, t,
marked_t, window)` keeps (docs/design.md, "Delayed eviction"), in any slot order."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dms_flex import masks
from dms_flex.cache import (
    CacheOverflowError,
    DMSKVCache,
    decode_stacked_begin,
    decode_stacked_end,
    stack_bookkeeping,
)
from dms_flex.quant import dequantize_kv, quantize_kv

D = 4
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- references
def marks_known_at(dec, last):
    """(last + 1,) bool: token t < last is marked iff dec[t + 1]; the newest token is not marked yet."""
    marked = torch.zeros(last + 1, dtype=torch.bool)
    marked[:last] = dec[1 : last + 1]
    return marked


def rule_kept(dec, last, window):
    """Positions the hard rule keeps at position `last` (none before the first token)."""
    if last < 0:
        return []
    t = torch.arange(last + 1)
    return t[masks.visible(torch.tensor(last), t, marks_known_at(dec, last), window)].tolist()


def live(cache, b, h):
    """{position: slot} of the live slots [0, length) of one (row, KV head)."""
    n = int(cache.length[b, h])
    return {int(p): s for s, p in enumerate(cache.slot_pos[b, h, :n].tolist())}


def assert_holds(cache, b, h, dec, last, keys, values):
    """The (row, KV head) holds exactly the rule's tokens, with their K/V (int8: quantize_kv's codes and
    scales), their marks, and dead slots past `length`. keys/values: (T, D) of this (row, KV head)."""
    kept = rule_kept(dec, last, cache.window)
    slots = live(cache, b, h)
    assert sorted(slots) == kept and int(cache.length[b, h]) == len(kept)
    assert len(slots) == int(cache.length[b, h])  # no position twice
    assert (cache.slot_pos[b, h, len(kept) : cache.capacity] == -1).all()
    if not kept:
        return
    marked = marks_known_at(dec, last)
    pos, idx = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
    assert torch.equal(cache.slot_marked[b, h, idx], marked[pos])
    for buf, scale, src in ((cache.k, cache.k_scale, keys), (cache.v, cache.v_scale, values)):
        if cache.quantized:
            codes, scales = quantize_kv(src[pos])
            assert torch.equal(buf[b, h, idx], codes) and torch.equal(scale[b, h, idx], scales)
        else:
            assert torch.equal(buf[b, h, idx], src[pos])


def decode_all(cache, dec, keys, values, positions):
    """decode_update for each position of `positions`, rows in lockstep. dec (B, H, T), keys (B, H, T, D)."""
    B = dec.shape[0]
    for p in positions:
        pos = torch.full((B,), p)
        cache.decode_update(keys[:, :, p, None], values[:, :, p, None], dec[:, :, p], pos)


def random_sequence(g, B, H, T, p_mark):
    dec = torch.rand(B, H, T, generator=g) < p_mark
    return dec, torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


# ----------------------------------------------------------------------------- (a) decode
@FEW
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    window=st.integers(0, 4),
    T=st.integers(1, 24),
    p_mark=st.sampled_from([0.2, 0.5, 0.9]),
    capacity=st.sampled_from(["loose", "exact", "tight"]),
    int8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_updates_keep_what_the_rule_keeps(B, H, window, T, p_mark, capacity, int8, seed):
    """Random decode_update calls: after every step each (row, KV head) holds exactly the rule's tokens;
    the overflow flag rises exactly when some count exceeds the capacity, and then no live token's slot
    is overwritten (only slots of tokens the rule has dropped are ever reused)."""
    dec, keys, values = random_sequence(torch.Generator().manual_seed(seed), B, H, T, p_mark)
    counts = torch.tensor(
        [[[len(rule_kept(dec[b, h], p, window)) for h in range(H)] for b in range(B)] for p in range(T)]
    )  # (T, B, H)
    most = int(counts.max())
    C = {"loose": T, "exact": most, "tight": max(1, most - 1 - seed % 3)}[capacity]
    cache = DMSKVCache(B, H, D, C, window, dtype=torch.float32, kv_dtype=torch.int8 if int8 else None)
    ever = torch.zeros(B, H, dtype=torch.bool)
    for p in range(T):
        before_pos, before_k = cache.slot_pos[..., :C].clone(), cache.k[..., :C, :].clone()
        decode_all(cache, dec, keys, values, [p])
        over = counts[p] > C
        newly = over & ~ever
        ever |= over
        assert bool(cache.overflow) == bool(ever.any()), p
        changed = (cache.slot_pos[..., :C] != before_pos) | (cache.k[..., :C, :] != before_k).any(-1)
        for b in range(B):
            for h in range(H):
                if newly[b, h]:  # the new token went to the scratch slot
                    assert not changed[b, h].any()
                marked = marks_known_at(dec[b, h], p)
                for s in torch.nonzero(changed[b, h]).flatten().tolist():
                    old = int(before_pos[b, h, s])  # a fresh slot, or one whose token the rule dropped
                    assert old == -1 or (marked[old] and p - old > window), (p, b, h, s, old)
                if not ever[b, h]:
                    assert_holds(cache, b, h, dec[b, h], p, keys[b, h], values[b, h])
    event("overflowed" if ever.any() else "fits")
    if ever.any():
        with pytest.raises(CacheOverflowError, match=f"capacity {C}"):
            cache.check_overflow()
    else:
        cache.check_overflow()


# the draws of the decode-update equivalence tests below (their caches: `_ragged_layers`)
RAGGED = dict(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    window=st.integers(0, 4),
    first_max=st.integers(0, 6),
    T=st.integers(1, 14),
    C=st.integers(1, 20),
    store=st.sampled_from(["float32", "bfloat16", "int8"]),
    seed=st.integers(0, 2**16),
)


def _ragged_layers(n, B, H, C, window, store, first_max, g):
    """n caches (float32 / bfloat16 / int8 storage) each given one append of ragged rows (row b holds the
    first `first[b]` of first_max random tokens, so rows decode from different positions, some from 0):
    (caches, first), or None when that append already overflows."""
    kv_dtype = torch.int8 if store == "int8" else None
    dtype = torch.bfloat16 if store == "bfloat16" else torch.float32
    first = torch.randint(0, first_max + 1, (B,), generator=g)
    layers = [DMSKVCache(B, H, D, C, window, dtype=dtype, kv_dtype=kv_dtype) for _ in range(n)]
    if first_max > 0:
        for c in layers:
            q, k, v = torch.randn(3, B, H, first_max, D, generator=g).to(dtype)
            lg = torch.randn(B, H, first_max, generator=g)
            try:
                c.append(q, k, v, lg, torch.zeros_like(first), first)
            except CacheOverflowError:
                return None
    return layers, first


@FEW
@given(**RAGGED)
def test_eager_decode_update_is_bit_identical_to_the_indexed_one(B, H, window, first_max, T, C, store, seed):
    """The CPU's eager decode_update (flat indices shared by the layers of a step) leaves every buffer
    exactly as the static-shape indexed body (the fused kernel's reference) does: after an append of
    ragged rows (so rows decode at different positions, some from position 0), through window
    exits, overflow and every storage (float32 K/V into a bf16 cache are converted), with two layers
    stepping on one in-place-advanced position tensor."""
    g = torch.Generator().manual_seed(seed)
    made = _ragged_layers(2, B, H, C, window, store, first_max, g)
    if made is None:
        return
    layers, first = made
    pairs = [(c, copy.deepcopy(c)) for c in layers]
    pos = first.clone()
    for _ in range(T):
        for eager, indexed in pairs:  # the layers of one step: the second reuses the first's indices
            kv = torch.randn(2, B, 1, H, D, generator=g).transpose(2, 3)  # (B, H, 1, D) views, as the model's
            evict_prev = torch.rand(B, H, generator=g) < 0.6
            eager._decode_update_eager(kv[0], kv[1], evict_prev, pos)
            indexed._decode_update_indexed(kv[0], kv[1], evict_prev, pos)
            for name, buf in indexed.named_buffers():
                assert torch.equal(getattr(eager, name), buf), name
        pos.add_(1)
    event("overflowed" if any(bool(c.overflow) for c, _ in pairs) else "fits")


@FEW
@given(L=st.integers(1, 3), **RAGGED)
def test_stacked_decode_bookkeeping_is_bit_identical_to_the_indexed_one(L, B, H, window, first_max, T, C, store, seed):
    """The bookkeeping of all layers at once on stacked buffers (decode_stacked_begin, each layer's K/V
    through _write_rows, decode_stacked_end with every layer's decisions) leaves every buffer of every
    layer exactly as one _decode_update_indexed per layer does, after ragged appends (rows at different
    positions, some at 0), through window exits and up to overflow. A step it declines (window 0, a row
    at position 0, a predecessor in the scratch slot, an overflow) has written nothing, and the
    per-layer decode_update then runs, as the model's decode step does."""
    g = torch.Generator().manual_seed(seed)
    made = _ragged_layers(L, B, H, C, window, store, first_max, g)
    if made is None:
        return
    layers, first = made
    refs = [copy.deepcopy(c) for c in layers]
    stack = stack_bookkeeping(layers)
    assert stack is not None and stack.current(layers)
    for c, ref in zip(layers, refs):  # stacking kept the values; the buffers are views of the stack now
        for name, buf in ref.named_buffers():
            assert torch.equal(getattr(c, name), buf), name
        assert c.length.data_ptr() == stack.length[layers.index(c)].data_ptr()
    pos = first.clone()
    ran = 0
    for _ in range(T):
        kvs = [torch.randn(2, B, 1, H, D, generator=g).transpose(2, 3) for _ in range(L)]
        evict = torch.rand(L, B, H, generator=g) < 0.6
        before = [{n: b.clone() for n, b in c.named_buffers()} for c in layers]
        step = decode_stacked_begin(stack, window, pos)
        if step is None:
            for c, was in zip(layers, before):
                for name, buf in c.named_buffers():
                    assert torch.equal(buf, was[name]), name  # declined before writing anything
            for i, c in enumerate(layers):
                c.decode_update(kvs[i][0], kvs[i][1], evict[i], pos)
        else:
            ran += 1
            for i, c in enumerate(layers):
                assert step.lengths[i] == c.length.view(-1).tolist()
                n = step.dead[i].shape[-1]
                assert torch.equal(step.dead[i], torch.arange(n) >= c.length.view(-1, 1, 1))
                c._write_rows(kvs[i][0], kvs[i][1], step.kv_rows[i])
            decode_stacked_end(stack, step, evict)
        for i, ref in enumerate(refs):
            ref._decode_update_indexed(kvs[i][0], kvs[i][1], evict[i], pos)
            for name, buf in ref.named_buffers():
                assert torch.equal(getattr(layers[i], name), buf), (i, name)
        pos.add_(1)
    event(f"stacked steps: {'some' if ran else 'none'}")
    event("overflowed" if any(bool(c.overflow) for c in layers) else "fits")


def test_stacked_bookkeeping_steps_aside_for_caches_it_no_longer_holds():
    """`current` is False once a cache's buffer is replaced (a deepcopy or `.to()` of one cache, a buffer
    assigned anew), and stacking refuses caches of different shapes; a deepcopy of all of them together
    keeps them views of the copied stack."""
    layers = [DMSKVCache(2, 2, D, 8, 3, dtype=torch.float32) for _ in range(3)]
    assert stack_bookkeeping(layers[:1] + [DMSKVCache(2, 2, D, 9, 3, dtype=torch.float32)]) is None
    stack = stack_bookkeeping(layers)
    both = copy.deepcopy((stack, layers))
    assert both[0].current(both[1])
    both[1][1].win_slot.fill_(0)
    assert (both[0].win_slot[1] == 0).all() and (stack.win_slot[1] == 8).all()
    layers[2] = copy.deepcopy(layers[2])
    assert not stack.current(layers)
    layers = [DMSKVCache(2, 2, D, 8, 3, dtype=torch.float32) for _ in range(2)]
    stack = stack_bookkeeping(layers)
    layers[0].length = torch.zeros(2, 2, dtype=torch.long)
    assert not stack.current(layers)


# ----------------------------------------------------------------------------- (b) append
@FEW
@given(data=st.data())
def test_append_keeps_what_token_by_token_decoding_keeps(data):
    """A chunk appended (ragged rows, right padding) onto a cache that holds earlier tokens (a first
    append and decode steps) keeps the same tokens as feeding every token of each row through
    decode_update, which is the rule; its attention is softmax over the keys the rule shows each query;
    both caches go on decoding alike (the window ring was rebuilt); a chunk that would not fit raises
    CacheOverflowError and writes nothing."""
    draw = data.draw
    B, H, G = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    window = draw(st.integers(0, 4))
    first = [draw(st.integers(0, 8)) for _ in range(B)]  # the first append's real tokens per row
    steps = draw(st.integers(0, 3))  # decode steps, rows in lockstep
    n = draw(st.integers(1, 8))
    n_valid = [draw(st.integers(0, n)) for _ in range(B)]
    after = draw(st.integers(0, 3))  # decode steps after the chunk
    int8 = draw(st.booleans())
    p_mark = draw(st.sampled_from([0.3, 0.6, 0.9]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    T = 8 + 3 + 8 + 3
    dec, keys, values = random_sequence(g, B, H, T, p_mark)
    pos0 = torch.tensor(first) + steps  # first position of the chunk, per row
    end = pos0 + torch.tensor(n_valid)  # tokens seen after the chunk

    def counts(upto):  # the rule's count per (row, head) after tokens [0, upto_b)
        return torch.tensor([[len(rule_kept(dec[b, h], int(upto[b]) - 1, window)) for h in range(H)] for b in range(B)])

    need = int(counts(end).max())  # the chunk fits exactly; one slot fewer must raise
    # a cache has at least one slot: with nothing to keep (need 0), "exact" is that one slot
    C = {"loose": T + 1, "exact": max(1, need), "short": max(1, need - 1)}[
        draw(st.sampled_from(["loose", "exact", "short"]))
    ]
    assume(int(counts(pos0).max()) <= C)  # the history itself fits
    kv_dtype = torch.int8 if int8 else None

    def logits_at(rows_pos, width, real):
        """(B, H, width) logits +1 / -1 from dec at each row's positions; random signs past the real ones."""
        idx = (rows_pos[:, None] + torch.arange(width)[None]).clamp(max=T - 1)
        lg = torch.where(dec.gather(2, idx[:, None].expand(B, H, width)), 1.0, -1.0)
        pad = torch.arange(width)[None, None] >= torch.as_tensor(real)[:, None, None]
        return torch.where(pad, torch.randint(0, 2, lg.shape, generator=g) * 2.0 - 1, lg)

    def chunk(buf, rows_pos, width):
        idx = (rows_pos[:, None] + torch.arange(width)[None]).clamp(max=T - 1)
        return buf.gather(2, idx[:, None, :, None].expand(B, H, width, D))

    def decode_rows(c, pos):  # one decode step, each row at its own position
        evict_prev = dec.gather(2, pos[:, None, None].expand(B, H, 1))[..., 0]
        c.decode_update(chunk(keys, pos, 1), chunk(values, pos, 1), evict_prev, pos)

    cache = DMSKVCache(B, H, D, C, window, dtype=torch.float32, kv_dtype=kv_dtype)
    zero = torch.zeros(B, dtype=torch.long)
    if max(first) > 0:
        w0 = max(first)
        cache.append(
            torch.randn(B, H * G, w0, D, generator=g),
            chunk(keys, zero, w0),
            chunk(values, zero, w0),
            logits_at(zero, w0, first),
            zero,
            torch.tensor(first),
        )
    for s in range(steps):
        decode_rows(cache, torch.tensor(first) + s)
    for b in range(B):
        for h in range(H):
            assert_holds(cache, b, h, dec[b, h], int(pos0[b]) - 1, keys[b, h], values[b, h])

    q = torch.randn(B, H * G, n, D, generator=g)
    before = copy.deepcopy(cache)
    args = (q, chunk(keys, pos0, n), chunk(values, pos0, n), logits_at(pos0, n, n_valid), pos0, torch.tensor(n_valid))
    event("chunk overflows" if int(counts(end).max()) > C else "chunk fits")
    if int(counts(end).max()) > C:
        with pytest.raises(CacheOverflowError, match=f"holds {C} per batch row"):
            cache.append(*args)
        for name, buf in before.named_buffers():
            assert torch.equal(getattr(cache, name), buf), name
        return
    out = cache.append(*args)

    # the reference: every token of each row through decode_update on a cache of its own
    ref = []
    for b in range(B):
        one = DMSKVCache(1, H, D, C, window, dtype=torch.float32, kv_dtype=kv_dtype)
        decode_all(one, dec[b : b + 1], keys[b : b + 1], values[b : b + 1], range(int(end[b])))
        ref.append(one)
    for b in range(B):
        for h in range(H):
            assert live(cache, b, h).keys() == live(ref[b], 0, h).keys()
            assert_holds(cache, b, h, dec[b, h], int(end[b]) - 1, keys[b, h], values[b, h])
            assert_holds(ref[b], 0, h, dec[b, h], int(end[b]) - 1, keys[b, h], values[b, h])

    # attention of each real query over the keys the rule shows it (as the cache holds them)
    if int8:
        k_read, v_read = dequantize_kv(*quantize_kv(keys)), dequantize_kv(*quantize_kv(values))
    else:
        k_read, v_read = keys, values
    for b in range(B):
        for i in range(n_valid[b]):
            P = int(pos0[b]) + i
            for hq in range(H * G):
                h = hq // G
                t = torch.arange(P + 1)
                vis = masks.visible(torch.tensor(P), t, marks_known_at(dec[b, h], P), window)
                s = (k_read[b, h, : P + 1][vis] @ q[b, hq, i]) * D**-0.5
                want = torch.softmax(s, 0) @ v_read[b, h, : P + 1][vis]
                assert torch.allclose(out[b, hq, i], want, atol=1e-5), (b, i, hq)

    # both go on decoding alike: the ring of the last window + 1 positions was rebuilt right
    for s in range(after):
        pos = end + s
        decode_rows(cache, pos)
        for b in range(B):
            decode_all(ref[b], dec[b : b + 1], keys[b : b + 1], values[b : b + 1], [int(pos[b])])
    if int((counts(end + after)).max()) <= C:
        assert not bool(cache.overflow)
        for b in range(B):
            for h in range(H):
                assert live(cache, b, h).keys() == live(ref[b], 0, h).keys()
                assert_holds(cache, b, h, dec[b, h], int(end[b]) + after - 1, keys[b, h], values[b, h])


# ----------------------------------------------------------------------------- (c) reset
@pytest.mark.parametrize("int8", [False, True])
def test_reset_restores_a_fresh_cache(int8):
    """After appends, decode steps and an overflow, reset() gives the buffers of a new cache, and the cache
    then behaves exactly like a new one."""
    B, H, C, w = 2, 2, 6, 2
    kv_dtype = torch.int8 if int8 else None
    g = torch.Generator().manual_seed(3)
    dec, keys, values = random_sequence(g, B, H, 20, 0.5)
    dec[0, 0] = False  # row 0, head 0 keeps everything: 20 tokens overflow 6 slots
    used = DMSKVCache(B, H, D, C, w, dtype=torch.float32, kv_dtype=kv_dtype)
    decode_all(used, dec, keys, values, range(20))
    assert bool(used.overflow)
    used.reset()
    fresh = DMSKVCache(B, H, D, C, w, dtype=torch.float32, kv_dtype=kv_dtype)
    for name in ("length", "slot_pos", "slot_marked", "win_slot", "overflow"):
        assert torch.equal(getattr(used, name), getattr(fresh, name)), name
    dec, keys, values = random_sequence(g, B, H, 12, 0.7)
    q = torch.randn(B, H, 5, D, generator=g)
    lg = torch.where(dec[..., :5], 1.0, -1.0)
    n_valid, zero = torch.tensor([5, 3]), torch.zeros(B, dtype=torch.long)
    outs = [c.append(q, keys[:, :, :5], values[:, :, :5], lg, zero, n_valid) for c in (used, fresh)]
    assert torch.equal(outs[0], outs[1])
    for p in range(3, 8):  # row 1 goes on from position 3 (its real tokens), row 0 from 5
        pos = torch.tensor([p + 2, p])
        idx = pos[:, None, None, None].expand(B, H, 1, D)
        for c in (used, fresh):
            c.decode_update(keys.gather(2, idx), values.gather(2, idx), dec[:, :, p], pos)
    for name, buf in fresh.named_buffers():
        if name in ("k", "v", "k_scale", "v_scale"):  # only live slots are defined
            for b in range(B):
                for h in range(H):
                    n = int(fresh.length[b, h])
                    assert torch.equal(getattr(used, name)[b, h, :n], buf[b, h, :n]), name
        else:
            assert torch.equal(getattr(used, name), buf), name


# ----------------------------------------------------------------------------- (d) int8 storage
def test_int8_storage_holds_quantize_kv_codes_and_scales():
    """An int8 cache stores quantize_kv's codes and per-token scales after append and decode, reads back
    their dequantized values, and counts D int8 bytes plus a float32 scale per slot for K and for V."""
    B, H, C, w = 2, 2, 16, 1
    g = torch.Generator().manual_seed(5)
    dec, keys, values = random_sequence(g, B, H, 12, 0.5)
    keys[0, 1, 2] *= 100  # one large token (kept: unmarked), its own scale, the others unaffected
    dec[0, 1, 3] = False
    cache = DMSKVCache(B, H, D, C, w, dtype=torch.float32, kv_dtype=torch.int8)
    assert cache.k.dtype == cache.v.dtype == torch.int8 and cache.k_scale.dtype == torch.float32
    zero = torch.zeros(B, dtype=torch.long)
    cache.append(
        torch.randn(B, H, 7, D, generator=g),
        keys[:, :, :7],
        values[:, :, :7],
        torch.where(dec[..., :7], 1.0, -1.0),
        zero,
        torch.full((B,), 7),
    )
    decode_all(cache, dec, keys, values, range(7, 12))
    kq, ks = quantize_kv(keys)
    vq, vs = quantize_kv(values)
    for b in range(B):
        for h in range(H):
            assert_holds(cache, b, h, dec[b, h], 11, keys[b, h], values[b, h])
            slots = live(cache, b, h)
            pos, idx = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
            assert torch.equal(cache.k[b, h, idx], kq[b, h, pos])
            assert torch.equal(cache.k_scale[b, h, idx], ks[b, h, pos])
            assert torch.equal(cache.v[b, h, idx], vq[b, h, pos])
            assert torch.equal(cache.v_scale[b, h, idx], vs[b, h, pos])
    n = int(cache.length.max())
    k_read, v_read = cache._read(n, torch.float32)
    assert torch.equal(k_read, dequantize_kv(cache.k[:, :, :n], cache.k_scale[:, :, :n]))
    assert (k_read[0, 1, live(cache, 0, 1)[2]] - keys[0, 1, 2]).abs().max() <= 0.51 * ks[0, 1, 2]
    assert ks[0, 1, 2] > 50 * ks[0, 1, :2].max()
    assert cache.bytes_per_slot() == 2 * (D + 4)


# ----------------------------------------------------------------------------- (b2) the CPU prefill by blocks
@pytest.mark.parametrize(
    "window, p_mark, int8, seed", [(0, 0.85, False, 0), (5, 0.85, False, 1), (40, 0.5, True, 2), (300, 0.9, False, 3)]
)
def test_cpu_blocked_prefill_equals_the_masked_reference(window, p_mark, int8, seed, monkeypatch):
    """Long appends on the CPU (n >= 64) attend by query blocks over only the keys a block can see
    (kernels/prefill_cpu.py); the reference is the full visibility mask (`masked_attention`, passed as
    `attend`). Two turns (a first prefill, decode steps, a second chunk over the live cache), ragged right
    padding, blocks of 32 queries so that each chunk spans several; float64; the caches end identical."""
    from dms_flex.kernels import prefill_cpu
    from dms_flex.kernels.reference import masked_attention

    monkeypatch.setattr(prefill_cpu, "BLOCK", 32)
    g = torch.Generator().manual_seed(seed)
    B, H, G, Dh = 2, 2, 3, 8
    n1, n2, C = 150, 100, 400
    dt = torch.float32 if int8 else torch.float64
    fast = DMSKVCache(B, H, Dh, C, window, dtype=dt, kv_dtype=torch.int8 if int8 else None)
    ref = copy.deepcopy(fast)

    def turn(n, pos, n_valid):
        q = torch.randn(B, H * G, n, Dh, generator=g, dtype=dt)
        k = torch.randn(B, H, n, Dh, generator=g, dtype=dt)
        v = torch.randn(B, H, n, Dh, generator=g, dtype=dt)
        lg = torch.where(torch.rand(B, H, n, generator=g) < p_mark, 1.0, -1.0).to(dt)
        args = (q, k, v, lg, pos, n_valid)
        out = fast.append(*args)
        want = ref.append(*args, attend=masked_attention)
        tol = 1e-5 if int8 else 1e-12  # int8 storage needs float32 (its quantizer's input dtype)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        for name, buf in ref.named_buffers():
            assert torch.equal(getattr(fast, name), buf), name

    turn(n1, torch.zeros(B, dtype=torch.long), torch.tensor([n1, 117]))
    pos = torch.tensor([n1, 117])
    for s in range(3):  # decode steps between the turns
        for c in (fast, ref):
            gk = torch.Generator().manual_seed(100 + s)
            kk = torch.randn(B, H, 1, Dh, generator=gk, dtype=dt)
            vv = torch.randn(B, H, 1, Dh, generator=gk, dtype=dt)
            c.decode_update(kk, vv, torch.rand(B, H, generator=gk) < p_mark, pos + s)
    turn(n2, pos + 3, torch.tensor([n2, 70]))
