"""StreamingLLM / H2O / TOVA in the compact cache against a plain-loop reference of each rule."""

import math

import pytest
import torch

from dms_flex import torchtune_model as tm
from dms_flex.eval import baselines as bl

from .helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- the reference
def ref_budget(seen, cr):
    return math.ceil(seen / cr - 1e-9)


def ref_reserved(name, budget, sinks=4, heavy_fraction=0.5):
    """(sinks, recent) inside the budget, written out per policy."""
    if name == "streaming":
        s = min(sinks, budget - 1) if budget >= 1 else 0
        return s, budget - s
    if name == "h2o":
        return 0, budget - math.floor(budget * heavy_fraction)
    return 0, min(budget, 1)


def ref_evict_until(name, entries, budget, last):
    """entries: list of dicts(pos, k, v, score); drop the lowest (value, pos) unprotected one until
    the budget holds."""
    s, r = ref_reserved(name, budget)
    while len(entries) > budget:
        cands = [e for e in entries if not (e["pos"] < s or e["pos"] > last - r)]
        value = (lambda e: e["pos"]) if name == "streaming" else (lambda e: e["score"])
        worst = min(cands, key=lambda e: (value(e), e["pos"]))
        entries.remove(worst)


def ref_attend(qvec, entries):
    """One query head over a list of entries, float64 loops. Returns (out, weights)."""
    D = qvec.shape[0]
    logits = [float(qvec @ e["k"]) / math.sqrt(D) for e in entries]
    m = max(logits)
    ex = [math.exp(x - m) for x in logits]
    z = sum(ex)
    w = [x / z for x in ex]
    out = sum(wi * e["v"] for wi, e in zip(w, entries))
    return out, w


class Reference:
    """One batch row; per layer and KV head a Python list of kept tokens."""

    def __init__(self, model, name, cr):
        self.m, self.name, self.cr = model, name, cr
        attn = model.layers[0].attn
        self.H, self.G = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
        self.kept = [[[] for _ in range(self.H)] for _ in model.layers]
        self.seen = 0

    def _layer_qkv(self, layer, x, pos):
        q, k, v, _ = tm.attention_inputs(layer, x, pos, None)
        return q[0].double(), k[0].double(), v[0].double()

    @torch.no_grad()
    def prefill(self, tokens):
        n = len(tokens)
        pos = torch.arange(self.seen, self.seen + n)[None]
        x = self.m.tok_embeddings(torch.tensor([tokens]))
        last = self.seen + n - 1
        budget = ref_budget(self.seen + n, self.cr)
        for li, layer in enumerate(self.m.layers):
            q, k, v = self._layer_qkv(layer, x, pos)
            out = torch.zeros(self.H * self.G, n, q.shape[-1], dtype=torch.float64)
            for hh in range(self.H):
                old = self.kept[li][hh]
                new = [dict(pos=self.seen + i, k=k[hh, i], v=v[hh, i], score=0.0) for i in range(n)]
                for e in new:
                    e["last_w"] = 0.0
                for i in range(n):
                    visible = old + new[: i + 1]
                    wsum = [0.0] * len(visible)
                    for g in range(self.G):
                        o, w = ref_attend(q[hh * self.G + g, i], visible)
                        out[hh * self.G + g, i] = o
                        wsum = [a + b / self.G for a, b in zip(wsum, w)]
                    for e, w in zip(visible, wsum):
                        if self.name == "h2o":
                            e["score"] += w
                        if i == n - 1 and self.name == "tova":
                            e["score"] = w
                entries = old + new
                ref_evict_until(self.name, entries, budget, last)
                self.kept[li][hh] = entries
            x = tm.finish_layer(layer, x, out.float()[None])
        self.seen += n
        return self.m.output(self.m.norm(x))[0, -1]

    @torch.no_grad()
    def step(self, token):
        pos = torch.tensor([[self.seen]])
        x = self.m.tok_embeddings(torch.tensor([[token]]))
        budget = ref_budget(self.seen + 1, self.cr)
        for li, layer in enumerate(self.m.layers):
            q, k, v = self._layer_qkv(layer, x, pos)
            out = torch.zeros(self.H * self.G, 1, q.shape[-1], dtype=torch.float64)
            for hh in range(self.H):
                entries = self.kept[li][hh] + [dict(pos=self.seen, k=k[hh, 0], v=v[hh, 0], score=0.0)]
                wsum = [0.0] * len(entries)
                for g in range(self.G):
                    o, w = ref_attend(q[hh * self.G + g, 0], entries)
                    out[hh * self.G + g, 0] = o
                    wsum = [a + b / self.G for a, b in zip(wsum, w)]
                for e, w in zip(entries, wsum):
                    if self.name == "h2o":
                        e["score"] += w
                    elif self.name == "tova":
                        e["score"] = w
                ref_evict_until(self.name, entries, budget, self.seen)
                self.kept[li][hh] = entries
            x = tm.finish_layer(layer, x, out.float()[None])
        self.seen += 1
        return self.m.output(self.m.norm(x))[0, -1]

    def positions(self, li, hh):
        return sorted(e["pos"] for e in self.kept[li][hh])


def assert_same_kept(state, refs):
    for b, ref in enumerate(refs):
        for li, cache in enumerate(state.caches):
            for hh in range(ref.H):
                assert cache.kept_positions(b, hh) == ref.positions(li, hh), (b, li, hh)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", bl.POLICIES)
@pytest.mark.parametrize("cr", [1.0, 2.0, 3.0, 2.5])
def test_policy_keeps_what_the_reference_keeps_after_prefill_and_each_step(name, cr):
    m = tiny_model(heads=(4, 2))
    prompts = [[3, 9, 14, 1, 7, 30, 2, 5, 11, 8, 40, 6, 21], [17, 4, 33, 12, 9, 2, 50]]  # ragged
    policy = bl.EvictionPolicy(name, cr)
    state = bl.PolicyState(m, 2, policy, max_seq_len=40)
    tokens = torch.zeros(2, 13, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    logits = bl.prefill_with_policy(m, tokens, state, torch.tensor([13, 7]))
    refs = [Reference(m, name, cr) for _ in prompts]
    ref_logits = torch.stack([r.prefill(p) for r, p in zip(refs, prompts)])
    assert torch.allclose(logits, ref_logits, atol=1e-4), float((logits - ref_logits).abs().max())
    assert_same_kept(state, refs)
    for step in range(9):
        nxt = logits.argmax(-1, keepdim=True)
        logits = bl.decode_step_with_policy(m, nxt, state)
        ref_logits = torch.stack([r.step(int(t)) for r, t in zip(refs, nxt[:, 0])])
        assert torch.allclose(logits, ref_logits, atol=1e-4), (step, float((logits - ref_logits).abs().max()))
        assert_same_kept(state, refs)
        seen = state.next_pos
        for cache in state.caches:
            assert torch.equal(cache.length, torch.minimum(seen, policy.budget(seen))[:, None].expand_as(cache.length))


def test_streaming_keeps_sinks_and_a_contiguous_recent_window():
    m = tiny_model()
    policy = bl.EvictionPolicy("streaming", 4.0, sinks=2)
    state = bl.PolicyState(m, 1, policy, max_seq_len=64)
    logits = bl.prefill_with_policy(m, torch.randint(0, 64, (1, 30)), state)
    for _ in range(10):
        logits = bl.decode_step_with_policy(m, logits.argmax(-1, keepdim=True), state)
    seen = 40
    b = math.ceil(seen / 4)  # 10 = 2 sinks + 8 recent
    assert state.caches[0].kept_positions(0, 0) == [0, 1] + list(range(seen - (b - 2), seen))


def test_cr_one_is_the_dense_model_and_multi_turn_prefill_works():
    m = tiny_model(window=1000)
    prompt = torch.randint(0, 64, (2, 12))
    dense = tm.InferenceState(m, 2, max_seq_len=64, eviction=False)
    ref = tm.prefill(m, prompt, dense)
    for name in bl.POLICIES:
        state = bl.PolicyState(m, 2, bl.EvictionPolicy(name, 1.0), max_seq_len=64)
        out = bl.prefill_with_policy(m, prompt, state)
        assert torch.allclose(out, ref, atol=1e-4)
        tok = out.argmax(-1, keepdim=True)
        assert torch.allclose(bl.decode_step_with_policy(m, tok, state), tm.decode_step(m, tok, dense), atol=1e-4)
        # a second turn appended to a live cache
        turn = torch.randint(0, 64, (2, 5))
        assert torch.allclose(bl.prefill_with_policy(m, turn, state), tm.prefill(m, turn, dense), atol=1e-4)
        dense = tm.InferenceState(m, 2, max_seq_len=64, eviction=False)
        ref = tm.prefill(m, prompt, dense)


def test_multi_turn_prefill_matches_the_reference():
    m = tiny_model()
    for name in bl.POLICIES:
        state = bl.PolicyState(m, 1, bl.EvictionPolicy(name, 2.0), max_seq_len=64)
        ref = Reference(m, name, 2.0)
        first, second = [5, 9, 2, 44, 31, 7, 8, 19, 3], [12, 13, 60, 1, 2]
        bl.prefill_with_policy(m, torch.tensor([first]), state)
        ref.prefill(first)
        bl.decode_step_with_policy(m, torch.tensor([[23]]), state)
        ref.step(23)
        out = bl.prefill_with_policy(m, torch.tensor([second]), state)
        assert torch.allclose(out[0], ref.prefill(second), atol=1e-4)
        assert_same_kept(state, [ref])


def test_equal_live_bytes_across_policies_at_equal_cr():
    m = tiny_model()
    prompt = torch.randint(0, 64, (3, 21))
    for cr in (1.5, 2.0, 4.0, 7.0):
        live = {}
        for name in bl.POLICIES:
            state = bl.PolicyState(m, 3, bl.EvictionPolicy(name, cr), max_seq_len=64)
            logits = bl.prefill_with_policy(m, prompt, state)
            for _ in range(6):
                logits = bl.decode_step_with_policy(m, logits.argmax(-1, keepdim=True), state)
            live[name] = state.kv_bytes()["live"]
            c0 = state.caches[0]
            budget = math.ceil(27 / cr - 1e-9)
            assert live[name] == len(state.caches) * 3 * c0.k.shape[1] * budget * c0.bytes_per_slot()
            assert abs(state.compression().ratio - 27 / budget) < 1e-6
        assert len(set(live.values())) == 1, live


def test_policy_argument_errors():
    with pytest.raises(ValueError, match="policy"):
        bl.EvictionPolicy("lru", 2.0)
    with pytest.raises(ValueError, match="cr"):
        bl.EvictionPolicy("h2o", 0.5)
    p = bl.EvictionPolicy("h2o", 2.2)
    assert int(p.budget(torch.tensor(11))) == 5 and int(p.budget(torch.tensor(12))) == 6


def test_the_dms_passes_refuse_a_policy_cache():
    m = tiny_model()
    state = bl.PolicyState(m, 1, bl.EvictionPolicy("tova", 2.0), max_seq_len=32)
    with pytest.raises(TypeError, match="decode_step_with_policy"):
        tm.prefill(m, torch.tensor([[1, 2, 3]]), state)
