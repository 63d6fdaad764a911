"""Compact-cache inference against teacher-forced full-sequence forwards with the same hard mask."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dms_flex import stats
from dms_flex import torchtune_model as tm
from dms_flex.cache import CacheOverflowError
from dms_flex.config import DMSConfig

from .helpers import assert_matches_reference, greedy_cached, teacher_forced, tiny_model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    window=st.sampled_from([0, 1, 3, 6]),
    n_prompt=st.integers(1, 30),
    steps=st.integers(1, 20),
    decision=st.sampled_from(["borrowed", "adapter"]),
    scope=st.sampled_from(["head", "layer"]),
    offset=st.sampled_from([-1.0, 0.0, 2.0]),
    heads=st.sampled_from([(4, 2), (8, 2), (2, 2), (4, 1)]),
)
def test_cached_generation_equals_teacher_forced(seed, window, n_prompt, steps, decision, scope, offset, heads):
    m = tiny_model(seed=seed % 7, decision=decision, window=window, scope=scope, offset=offset, heads=heads)
    prompt = torch.randint(0, 64, (2, n_prompt), generator=torch.Generator().manual_seed(seed))
    full, logits, state = greedy_cached(m, prompt, steps)
    assert_matches_reference(m, full, logits, n_prompt, state)


def test_qwen2_long_prompt_over_several_windows_evicts_for_real():
    m = tiny_model("qwen2", window=4)
    prompt = torch.randint(0, 64, (2, 40))
    full, logits, state = greedy_cached(m, prompt, 12)
    assert_matches_reference(m, full, logits, 40, state)
    assert state.compression().ratio > 1.3  # really compressing, not a dense cache


def test_ragged_batch_each_row_is_its_own_sequence():
    m = tiny_model(window=2)
    lens = [7, 15, 1]
    rows = [torch.randint(0, 64, (1, n)) for n in lens]
    padded = torch.zeros(3, max(lens), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : r.shape[1]] = r
    state = tm.InferenceState(m, 3)
    logits = [tm.prefill(m, padded, state, lengths=torch.tensor(lens))]
    gen = []
    for _ in range(9):
        nxt = logits[-1].argmax(-1, keepdim=True)
        gen.append(nxt)
        logits.append(tm.decode_step(m, nxt, state))
    gen = torch.cat(gen, 1)
    logits = torch.stack(logits, 1)
    for i, r in enumerate(rows):
        full = torch.cat([r, gen[i : i + 1]], 1)
        ref, evicted = teacher_forced(m, full)
        assert torch.allclose(logits[i], ref[0, lens[i] - 1 :], atol=2e-4)
        for cache, ev in zip(state.caches, evicted):
            kept = (stats.kept_fraction(ev, 2) * full.shape[1]).round().long()
            assert torch.equal(cache.length[i], kept[0])


def test_multi_turn_appends_without_reprefill():
    m = tiny_model(window=3)
    t1 = torch.randint(0, 64, (2, 12))
    full1, logits1, state = greedy_cached(m, t1, 6)
    t2 = torch.randint(0, 64, (2, 9))  # the next user turn, appended to the live cache
    full2, logits2, state = greedy_cached(m, t2, 5, state)
    full = torch.cat([full1, full2], 1)
    assert_matches_reference(m, full, logits2, full1.shape[1] + t2.shape[1], state, atol=2e-4, rtol=1e-5)


def test_eviction_disabled_is_the_unmodified_model():
    m = tiny_model(window=2, offset=-3.0)
    toks = torch.randint(0, 64, (2, 25))
    with torch.no_grad():
        vanilla = m(toks)
        out = tm.forward_train(m, toks, eviction=False, training=False)
    assert torch.equal(tm.logits_of(m, out.hidden), vanilla)
    state = tm.InferenceState(m, 2, eviction=False)
    with torch.no_grad():
        lg = [tm.prefill(m, toks[:, :10], state)]
        for i in range(10, 25):
            lg.append(tm.decode_step(m, toks[:, i : i + 1], state))
    assert torch.allclose(torch.stack(lg, 1), vanilla[:, 9:], atol=1e-4)


def test_capacity_overflow_is_a_clear_error_and_overwrites_nothing():
    m = tiny_model(window=2, offset=50.0)  # never evicts
    state = tm.InferenceState(m, 1, capacity=8)
    with pytest.raises(CacheOverflowError, match="needs 10 KV slots but the DMS cache holds 8"):
        tm.prefill(m, torch.randint(0, 64, (1, 10)), state)
    assert int(state.caches[0].length.max()) == 0  # nothing written
    tm.prefill(m, torch.randint(0, 64, (1, 8)), state)
    before = state.caches[0].keys.clone()
    with torch.no_grad():
        tm.decode_step(m, torch.tensor([[3]]), state)
    with pytest.raises(CacheOverflowError, match="capacity 8"):
        state.check_overflow()
    assert torch.equal(state.caches[0].keys, before)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="supported: torchtune TransformerDecoder"):
        tm.add_dms(torch.nn.Linear(2, 2), DMSConfig())
    m = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tm.InferenceState(m, 1, capacity=1000)
    state = tm.InferenceState(m, 2)
    with pytest.raises(ValueError, match="batch 1 but the cache was made for 2"):
        tm.prefill(m, torch.zeros(1, 4, dtype=torch.long), state)
    with pytest.raises(ValueError, match="beyond max_seq_len=96"):
        tm.prefill(m, torch.zeros(2, 97, dtype=torch.long), state)
    with pytest.raises(ValueError, match="has no DMS"):
        from torchtune.models.llama3._component_builders import llama3

        tm.forward_train(
            llama3(vocab_size=8, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=8, max_seq_len=8),
            torch.zeros(1, 2, dtype=torch.long),
        )


def test_compiled_decode_has_no_recompiles():
    m = tiny_model(window=3, max_seq_len=1100)
    state = tm.InferenceState(m, 2, capacity=256)
    step = torch.compile(tm.decode_step, fullgraph=True)
    with torch.no_grad():
        logits = tm.prefill(m, torch.randint(0, 64, (2, 5)), state)
        tok = logits.argmax(-1, keepdim=True)
        tok = step(m, tok, state).argmax(-1, keepdim=True)
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(1000 - 1):
                tok = step(m, tok, state).argmax(-1, keepdim=True)
    state.check_overflow()
    assert int(state.next_pos[0]) == 1005
    assert state.compression().ratio > 2  # the 256-slot cache really held 1005 tokens


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    window=st.sampled_from([0, 2, 5]),
    n_prompt=st.integers(2, 40),
    chunk=st.integers(1, 17),
    decision=st.sampled_from(["borrowed", "adapter"]),
    kv=st.sampled_from([None, "int8"]),
)
def test_chunked_prefill_equals_one_pass(seed, window, n_prompt, chunk, decision, kv):
    """A prompt appended in chunks (each a later turn of the one before) gives the same logits, the same
    cache contents and the same continuation as one pass; rows of different lengths included."""
    m = tiny_model(seed=seed % 5, decision=decision, window=window)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 64, (3, n_prompt), generator=gen)
    lengths = torch.randint(1, n_prompt + 1, (3,), generator=gen)
    kv_dtype = torch.int8 if kv else None
    one = tm.InferenceState(m, 3, kv_dtype=kv_dtype)
    many = tm.InferenceState(m, 3, kv_dtype=kv_dtype)
    a = tm.prefill(m, prompt, one, lengths)
    b = tm.prefill(m, prompt, many, lengths, chunk_size=chunk)
    # int8: float rounding of a different summation order can move a K/V code by one step
    tol = 3e-3 if kv else 1e-4
    assert torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())
    for c1, c2 in zip(one.caches, many.caches):
        assert torch.equal(c1.length, c2.length)
        for b_ in range(3):
            for h in range(c1.length.shape[1]):
                n = int(c1.length[b_, h])
                assert torch.equal(c1.slot_pos[b_, h, :n], c2.slot_pos[b_, h, :n])
                if not kv:
                    assert torch.allclose(c1.k[b_, h, :n], c2.k[b_, h, :n], atol=1e-5)
    tok = a.argmax(-1, keepdim=True)
    assert torch.allclose(tm.decode_step(m, tok, one), tm.decode_step(m, tok, many), atol=tol, rtol=tol)


def test_chunked_prefill_matches_teacher_forced():
    m = tiny_model("qwen2", window=4)
    prompt = torch.randint(0, 64, (2, 40))
    full, logits, state = greedy_cached(m, prompt, 6, chunk_size=9)
    assert_matches_reference(m, full, logits, 40, state)


def test_compiled_prefill_halves_trace_and_match_eager(monkeypatch):
    """The compiled prefill path (tm.prefill(compile=True) on CUDA) traced by dynamo with dynamic shapes
    and fullgraph on the CPU (aot_eager backend: the graphs, not inductor's code) equals eager prefill
    over several chunk lengths, and needs one graph per half for all layers and lengths."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = (
        torch.compile(tm.attention_inputs, dynamic=True, fullgraph=True, backend="aot_eager"),
        torch.compile(tm.finish_layer, dynamic=True, fullgraph=True, backend="aot_eager"),
    )
    monkeypatch.setattr(tm, "_compiled_layer_halves", lambda: compiled)
    monkeypatch.setattr(tm, "_PREFILL_COMPILE", {"ok": True})
    m = tiny_model(decision="adapter", window=3)
    prompt = torch.randint(0, 64, (2, 45))
    eager, comp = tm.InferenceState(m, 2), tm.InferenceState(m, 2)
    for c0, c1 in ((0, 20), (20, 33), (33, 45)):
        n_real = torch.full((2,), c1 - c0)
        pos = eager.next_pos.clone()
        ipos = pos[:, None] + torch.arange(c1 - c0)[None]
        a = tm._prefill_chunk(m, prompt[:, c0:c1], eager, pos, n_real, ipos)
        b = tm._prefill_chunk(m, prompt[:, c0:c1], comp, pos.clone(), n_real, ipos, compiled=True)
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        eager.next_pos.add_(n_real)
        comp.next_pos.add_(n_real)
    assert tm._PREFILL_COMPILE["ok"]
    for c1_, c2_ in zip(eager.caches, comp.caches):
        assert torch.equal(c1_.length, c2_.length)
