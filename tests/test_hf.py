"""dms_flex.hf: DMS inside transformers' Llama / Qwen2 / Qwen3 and generate(), checked against the
unmodified model, the torchtune path, the teacher-forced full-sequence path, per-row and one-shot runs."""

import copy
import inspect
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import dms_flex.hf as H
from dms_flex import DMSConfig, DMSConfigError
from dms_flex import torchtune_model as tm
from dms_flex.cache import CacheOverflowError
from dms_flex.checkpoints import dms_state_dict, load_dms_model, load_hf_checkpoint, save_hf_checkpoint

V = 128
TINY = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),  # q/k norms
}
# window 4 and offset 0 on random weights: about half of the tokens are marked
EVICTING = {
    "borrowed": DMSConfig(window=4, decision="borrowed", alpha_scale=100.0, alpha_offset=0.0),
    "adapter": DMSConfig(window=4, decision="adapter", alpha_scale=100.0, alpha_offset=0.0),
}


def _randomize(model, seed=0):
    """HF's init gives near-zero logits that would hide errors: bigger weights, non-unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dms_adapter" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def _randomize_adapters(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn.dms_adapter
            a.linear.weight.copy_(std * torch.randn(a.linear.weight.shape, generator=g))
            a.norm.weight.copy_(1 + 0.1 * torch.randn(a.norm.weight.shape, generator=g))


def make(arch, cfg=None, *, random_adapter=True, seed=0):
    """(vanilla model, DMS copy of it)."""
    cfg_cls, model_cls, kw = ARCHS[arch]
    vanilla = _randomize(model_cls(cfg_cls(**{**TINY, **kw})), seed)
    dms = copy.deepcopy(vanilla)
    if cfg is not None:
        H.enable_dms(dms, cfg)
        if cfg.decision == "adapter" and random_adapter:
            _randomize_adapters(dms, seed + 1)
        dms.eval()
    return vanilla, dms


def prompts(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (batch, length), generator=g)


def left_pad(rows):
    """Left-pad token lists with 0: (ids, attention_mask)."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r)
        mask[i, n - len(r) :] = 1
    return ids, mask


# generate()'s cache argument and output field: `cache` in transformers 5.24, `past_key_values` in 5.17
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_of(out):
    return getattr(out, "cache", None) if CACHE_KW == "cache" else out.past_key_values


def gen(model, ids, mask=None, n=8, **kw):
    kw.setdefault("do_sample", False)
    if "cache" in kw:
        kw[CACHE_KW] = kw.pop("cache")
    return model.generate(
        ids,
        attention_mask=mask if mask is not None else torch.ones_like(ids),
        max_new_tokens=n,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


def stacked_logits(out):
    return torch.stack(out.logits, dim=1)  # (B, new tokens, V)


def assert_close(a, b, atol=2e-4):
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs diff {err}"


def eviction_fraction(model, seq):
    """Fraction of (layer, kv head, token) decisions that mark a token, on a teacher-forced pass."""
    with H.capture_decisions(model) as logits, torch.no_grad():
        model(seq, use_cache=False)
    return torch.cat([l.flatten() for l in logits.values()]).gt(0).float().mean().item()


# ------------------------------------------------------------------------------------------------
# (a) eviction off == the unmodified model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_and_switched_off_eviction_equal_vanilla_generate(arch):
    ids, mask = left_pad([prompts(1, 11, 1)[0].tolist(), prompts(1, 7, 2)[0].tolist()])
    # a fresh retrofit (zero-init adapter: l = -offset < 0, nothing marked) is the unmodified model; the
    # borrowed variant zeroes a q channel, so it equals the unmodified model only with eviction off
    vanilla, fresh = make(arch, EVICTING["adapter"], random_adapter=False)
    ref = gen(vanilla, ids, mask)
    for model in (fresh, make(arch, EVICTING["borrowed"])[1]):
        if model is not fresh:
            H.set_eviction(model, False)
        out = gen(model, ids, mask)
        assert torch.equal(out.sequences, ref.sequences)
        assert_close(stacked_logits(out), stacked_logits(ref), atol=1e-4)
        assert isinstance(cache_of(out), H.DMSCache)
        # nothing evicted: every real token is held (the last generated one is not fed back)
        held = cache_of(out).live_lengths()[0]
        assert torch.equal(held, (mask.sum(1) + 8 - 1)[:, None].expand_as(held))
    H.set_eviction(model, True)
    assert not torch.equal(stacked_logits(gen(model, ids, mask)), stacked_logits(ref))


# ------------------------------------------------------------------------------------------------
# (b) HF path == torchtune path == teacher-forced reference, with real evictions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["borrowed", "adapter"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_matches_torchtune_and_teacher_forced(arch, decision, tmp_path):
    cfg = EVICTING[decision]
    _, model = make(arch, cfg)
    H.save_pretrained(model, tmp_path / "ckpt")
    tt = load_dms_model(tmp_path / "ckpt")  # the torchtune path, through dms_flex.checkpoints
    assert tt.dms == cfg and tt.dms_trained

    ids, n_new = prompts(2, 14, 3), 12
    out = gen(model, ids, n=n_new)
    seq = out.sequences
    state = tm.InferenceState(tt.model, batch_size=2, max_seq_len=64)
    with torch.no_grad():
        tt_logits = [tm.prefill(tt.model, ids, state)]
        tokens = [tt_logits[-1].argmax(-1, keepdim=True)]
        for _ in range(n_new - 1):
            tt_logits.append(tm.decode_step(tt.model, tokens[-1], state))
            tokens.append(tt_logits[-1].argmax(-1, keepdim=True))
        teacher = tm.logits_of(tt.model, tm.forward_train(tt.model, seq, training=False).hidden)
        hf_full = model(seq, use_cache=False).logits
    assert torch.equal(torch.cat([ids, *tokens], 1), seq)  # same greedy tokens
    got = stacked_logits(out)
    want = slice(ids.shape[1] - 1, seq.shape[1] - 1)
    assert_close(got, torch.stack(tt_logits, 1))
    assert_close(got, teacher[:, want])
    assert_close(hf_full, teacher)
    # real evictions, identical in both caches
    frac = eviction_fraction(model, seq)
    assert 0.25 < frac < 0.75, frac
    seen = seq.shape[1] - 1
    for layer, tt_cache in zip(cache_of(out).layers, state.caches):
        assert torch.equal(layer.live_lengths(), tt_cache.length)
        assert int(layer.live_lengths().max()) < seen
    assert cache_of(out).compression().ratio > 1.3


@pytest.mark.parametrize("decision", ["borrowed", "adapter"])
def test_qwen3_generate_matches_full_sequence_dms_forward(decision):
    _, model = make("qwen3", EVICTING[decision])
    ids, mask = left_pad([prompts(1, 15, 4)[0].tolist(), prompts(1, 10, 5)[0].tolist()])
    out = gen(model, ids, mask, n=12)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(seq, attention_mask=full_mask, use_cache=False).logits
    assert_close(stacked_logits(out), full[:, ids.shape[1] - 1 : -1])
    assert 0.25 < eviction_fraction(model, seq[:1]) < 0.75  # row 0 has no padding
    lengths = cache_of(out).live_lengths()
    assert all(int(l.max()) < 15 + 12 - 1 for l in lengths)
    assert cache_of(out).compression().ratio > 1.3


def test_qwen3_borrowed_neuron_is_read_after_q_norm_and_zeroed():
    cfg = EVICTING["borrowed"]
    _, model = make("qwen3", cfg)
    attn = model.model.layers[0].self_attn
    seen = {}
    h1 = attn.q_norm.register_forward_hook(lambda m, a, out: seen.setdefault("q", out))
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn_in", a[0]))
    ids = prompts(1, 9, 6)
    with H.capture_decisions(model) as logits, torch.no_grad():
        model(ids, use_cache=False)
    h1.remove(), h2.remove()
    q = seen["q"]  # (B, T, Hq, D): after q_norm, before RoPE
    group = 2
    expected = q[:, :, ::group, -1].transpose(1, 2) * cfg.alpha_scale - cfg.alpha_offset
    assert_close(logits[0], expected, atol=1e-4)
    # with the channel zeroed in those heads (before and after RoPE), the output equals attention
    # computed by hand from q with that channel removed
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    x = model.model.embed_tokens(ids)
    h = model.model.layers[0].input_layernorm(x)
    B, T, _ = h.shape
    k = attn.k_norm(attn.k_proj(h).view(B, T, -1, 16)).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, -1, 16).transpose(1, 2)
    qq = q.transpose(1, 2).clone()
    qq[:, ::group, :, -1] = 0
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    qr, kr = apply_rotary_pos_emb(qq, k, cos, sin)
    qr[:, ::group, :, -1] = 0
    from dms_flex import decisions, masks
    from dms_flex.kernels.reference import masked_attention

    evicted = decisions.hard_evict(decisions.shift_to_decided_token(logits[0]))
    pos = torch.arange(T)
    vis = masks.visible(pos[:, None], pos[None, :], evicted[:, :, None, :], cfg.window)
    ref = masked_attention(qr, kr, v, vis, scale=attn.scaling).transpose(1, 2).reshape(B, T, -1)
    assert_close(seen["attn_in"], ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (c) padded batch == per-row generation; (d) multi-turn == one shot; (e) sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,decision", [("llama", "borrowed"), ("qwen2", "adapter"), ("qwen3", "borrowed")])
def test_left_padded_batch_equals_rows_alone(arch, decision):
    _, model = make(arch, EVICTING[decision])
    rows = [prompts(1, n, 10 + n)[0].tolist() for n in (13, 6, 9)]
    ids, mask = left_pad(rows)
    out = gen(model, ids, mask, n=10)
    logits = stacked_logits(out)
    for i, r in enumerate(rows):
        alone = gen(model, torch.tensor([r]), n=10)
        assert torch.equal(out.sequences[i, ids.shape[1] :], alone.sequences[0, len(r) :])
        assert_close(logits[i], stacked_logits(alone)[0])
        # the row's cache holds exactly what the single-row cache holds
        for lb, la in zip(cache_of(out).live_lengths(), cache_of(alone).live_lengths()):
            assert torch.equal(lb[i], la[0])


@pytest.mark.parametrize("arch,decision", [("llama", "adapter"), ("qwen3", "borrowed")])
def test_multi_turn_with_kept_cache_equals_one_shot(arch, decision):
    _, model = make(arch, EVICTING[decision])
    ids, mask = left_pad([prompts(1, 12, 20)[0].tolist(), prompts(1, 8, 21)[0].tolist()])
    cache = H.DMSCache(model)
    turn1 = gen(model, ids, mask, n=6, cache=cache)
    assert cache_of(turn1) is cache and cache.get_seq_length() == ids.shape[1] + 6 - 1
    # second user turn: 5 new tokens for row 0, 3 for row 1 (padded in the middle of the sequence)
    new = prompts(2, 5, 22)
    new_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    ids2 = torch.cat([turn1.sequences, new * new_mask], 1)
    mask2 = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype), new_mask], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `past_key_values` is transformers' deprecated name for `cache`
        turn2 = gen(model, ids2, mask2, n=7, past_key_values=cache)
    one_shot = gen(model, ids2, mask2, n=7)
    assert torch.equal(turn2.sequences, one_shot.sequences)
    assert_close(stacked_logits(turn2), stacked_logits(one_shot))
    for la, lb in zip(cache.live_lengths(), cache_of(one_shot).live_lengths()):
        assert torch.equal(la, lb)
    assert torch.equal(cache.tokens_seen(), mask2.sum(1) + 7 - 1)
    # and each row equals its own conversation without padding
    for i in range(2):
        real = ids2[i][mask2[i].bool()][None]
        alone = gen(model, real, n=7)
        assert torch.equal(turn2.sequences[i, ids2.shape[1] :], alone.sequences[0, real.shape[1] :])


def test_sampling_runs_and_is_reproducible():
    vanilla, model = make("qwen2", EVICTING["borrowed"])
    ids, mask = left_pad([prompts(1, 10, 30)[0].tolist(), prompts(1, 6, 31)[0].tolist()])
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(7)
    a = gen(model, ids, mask, n=10, **kw)
    torch.manual_seed(7)
    b = gen(model, ids, mask, n=10, **kw)
    assert a.sequences.shape == (4, ids.shape[1] + 10)
    assert torch.equal(a.sequences, b.sequences)
    assert int(a.sequences.max()) < V and cache_of(a).compression().ratio > 1.2
    # with eviction off, sampling draws exactly what the unmodified model draws
    with H.eviction_disabled(model):
        torch.manual_seed(8)
        c = gen(model, ids, mask, n=10, do_sample=True)
    torch.manual_seed(8)
    d = gen(vanilla, ids, mask, n=10, do_sample=True)
    assert torch.equal(c.sequences, d.sequences)


def test_beam_search_reorders_the_cache():
    vanilla, model = make("llama", EVICTING["borrowed"])
    ids = prompts(2, 9, 40)
    with H.eviction_disabled(model):
        a = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3)
    b = vanilla.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3)
    assert torch.equal(a, b)
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3).shape == (2, 14)


def test_cache_grows_from_a_tiny_capacity_and_reports_memory():
    _, model = make("llama", EVICTING["adapter"])
    ids = prompts(2, 12, 50)
    small = H.DMSCache(model, initial_capacity=2)
    a = gen(model, ids, n=20, cache=small)
    b = gen(model, ids, n=20)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(stacked_logits(a), stacked_logits(b))
    assert all(layer.capacity >= int(layer.live_lengths().max()) for layer in small.layers)
    mem = small.kv_bytes()
    assert mem["live"] < mem["dense"]


def _compile_everywhere(backend="eager"):
    """transformers' CompileConfig for its auto-compile of the decode step, on any device (the CPU
    included); backend "eager" traces the whole graph (fullgraph) without code generation."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, backend=backend, mode=None)
    cc._compile_all_devices = True
    return cc


@pytest.mark.parametrize("arch,decision", [("llama", "adapter"), ("qwen3", "borrowed")])
def test_fixed_capacity_cache_is_compiled_by_generate_in_one_graph(arch, decision):
    """A fixed-capacity DMSCache is compileable: generate() compiles its decode forward (fullgraph) once,
    every later step and a second generate() reuse that graph, and tokens and logits equal the growable
    cache's eager decoding."""
    from torch._dynamo.utils import counters

    _, model = make(arch, EVICTING[decision])
    ids = prompts(2, 12, 50)
    grow = H.DMSCache(model, initial_capacity=4)
    assert not grow.is_compileable
    ref = gen(model, ids, n=12, cache=grow)
    torch._dynamo.reset()
    counters.clear()
    fixed = H.DMSCache(model, capacity=40)
    out = gen(model, ids, n=12, cache=fixed, compile_config=_compile_everywhere())
    assert fixed.is_compileable
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph for 11 decode steps
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(stacked_logits(out), stacked_logits(ref))
    for a, b in zip(fixed.live_lengths(), grow.live_lengths()):
        assert torch.equal(a, b)
    assert int(fixed.get_seq_length()) == ids.shape[1] + 11  # the last token is sampled, never cached
    assert fixed.compression().ratio == pytest.approx(grow.compression().ratio)
    assert fixed.kv_bytes()["live"] == grow.kv_bytes()["live"] < fixed.kv_bytes()["dense"]
    # the same cache again after reset(), and a new one of the same size: no recompilation
    fixed.reset()
    again = gen(model, ids, n=12, cache=fixed, compile_config=_compile_everywhere())
    other = gen(model, ids, n=12, cache=H.DMSCache(model, capacity=40), compile_config=_compile_everywhere())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(again.sequences, ref.sequences) and torch.equal(other.sequences, ref.sequences)


def test_fixed_capacity_cache_compiled_with_padding_turns_and_beams():
    """The compiled fixed-capacity cache on what generate() does around it: left padding, a second turn
    over the kept cache, beam search (rows reordered in place): all as the growable cache decodes."""
    _, model = make("qwen3", EVICTING["adapter"])
    ids, mask = left_pad([prompts(1, 12, 20)[0].tolist(), prompts(1, 7, 21)[0].tolist()])
    grow, fixed = H.DMSCache(model), H.DMSCache(model, capacity=48)
    torch._dynamo.reset()
    a = gen(model, ids, mask, n=6, cache=grow)
    b = gen(model, ids, mask, n=6, cache=fixed, compile_config=_compile_everywhere())
    assert torch.equal(a.sequences, b.sequences)
    assert_close(stacked_logits(a), stacked_logits(b))
    new = prompts(2, 5, 22)
    new_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    ids2 = torch.cat([a.sequences, new * new_mask], 1)
    mask2 = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype), new_mask], 1)
    a2 = gen(model, ids2, mask2, n=7, cache=grow)
    b2 = gen(model, ids2, mask2, n=7, cache=fixed, compile_config=_compile_everywhere())
    assert torch.equal(a2.sequences, b2.sequences)
    assert_close(stacked_logits(a2), stacked_logits(b2))
    assert torch.equal(grow.tokens_seen(), fixed.tokens_seen())
    for la, lb in zip(grow.live_lengths(), fixed.live_lengths()):
        assert torch.equal(la, lb)
    beams = dict(num_beams=3, output_logits=False, return_dict_in_generate=False)
    ids3 = prompts(2, 10, 23)
    c = model.generate(ids3, attention_mask=torch.ones_like(ids3), max_new_tokens=6, **beams)
    fixed3 = H.DMSCache(model, capacity=24)
    kw = {CACHE_KW: fixed3, "compile_config": _compile_everywhere()}
    d = model.generate(ids3, attention_mask=torch.ones_like(ids3), max_new_tokens=6, **beams, **kw)
    assert torch.equal(c, d)


def test_static_cache_implementation_means_a_fixed_dms_cache():
    """generate(cache_implementation="static"), as a keyword or in the generation config, gives a DMS
    model a fixed-capacity DMSCache of prompt + new tokens slots (what transformers compiles), with the
    growable cache's tokens."""
    _, model = make("llama", EVICTING["adapter"])
    ids = prompts(2, 12, 50)
    ref = gen(model, ids, n=9)
    out = gen(model, ids, n=9, cache_implementation="static", compile_config=_compile_everywhere())
    cache = cache_of(out)
    assert isinstance(cache, H.DMSCache) and cache.is_compileable and cache.layers[0].capacity == 12 + 9
    assert torch.equal(out.sequences, ref.sequences)
    assert_close(stacked_logits(out), stacked_logits(ref))
    model.generation_config.cache_implementation = "static"
    try:
        again = gen(model, ids, n=9)
        assert cache_of(again).is_compileable and torch.equal(again.sequences, ref.sequences)
        assert model.generation_config.cache_implementation == "static"  # the user's config is left as it was
    finally:
        model.generation_config.cache_implementation = None
    # max_length instead of max_new_tokens
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_length=17, cache_implementation="static")
    assert torch.equal(plain, ref.sequences[:, :17])
    with pytest.raises(ValueError, match='cache_implementation="static" on a DMS model needs the input_ids'):
        model.generate(max_new_tokens=3, cache_implementation="static")


def test_per_layer_capacities_calibrated_from_sample_text():
    """calibrated_capacities() applies the torchtune path's rule (layer_capacities) to what a DMSCache kept;
    a cache with those per-layer capacities decodes as the growable one, under compile."""
    _, model = make("llama", EVICTING["adapter"])
    sample = prompts(2, 40, 60)
    probe = H.DMSCache(model)
    with torch.no_grad():
        model(input_ids=sample, attention_mask=torch.ones_like(sample), **{CACHE_KW: probe})
    caps = probe.calibrated_capacities(56, headroom=1.5)
    # the rule by hand: window w always, plus 1.5 x the fullest head's kept fraction of the older tokens
    w = probe.window
    for layer, cap in zip(probe.layers, caps):
        kept = int(layer.kv.length.max())
        assert cap == min(56, w + math.ceil(1.5 * (kept - w) / (40 - w) * (56 - w)))
    assert len(set(caps)) > 1 or caps[0] < 56  # the sample's layers differ, or keep less than everything
    ids = prompts(2, 40, 61)
    ref = gen(model, ids, n=16)
    fixed = H.DMSCache(model, capacity=caps)
    assert [layer.capacity for layer in fixed.layers] == [0] * len(caps)  # allocated at the first forward
    out = gen(model, ids, n=16, cache=fixed, compile_config=_compile_everywhere())
    assert [layer.capacity for layer in fixed.layers] == caps
    assert torch.equal(out.sequences, ref.sequences)
    B, Hkv, D = 2, TINY["num_key_value_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    assert fixed.kv_bytes()["allocated"] == sum(2 * B * Hkv * (c + 1) * D * 4 for c in caps)  # + scratch slot
    with pytest.raises(ValueError, match="3 entries; the model has 2 layers"):
        H.DMSCache(model, capacity=[8, 8, 8])
    with pytest.raises(ValueError, match="positive number of slots, got 0"):
        H.DMSCache(model, capacity=[8, 0])
    with pytest.raises(ValueError, match="run the model over sample text first"):
        H.DMSCache(model).calibrated_capacities(56)
    ragged, mask = left_pad([prompts(1, 9, 62)[0].tolist(), prompts(1, 6, 63)[0].tolist()])
    uneven = H.DMSCache(model)
    gen(model, ragged, mask, n=2, cache=uneven)
    with pytest.raises(ValueError, match="same number of tokens"):
        uneven.calibrated_capacities(56)


def test_fixed_capacity_cache_raises_when_it_runs_out():
    _, model = make("llama", EVICTING["adapter"])
    ids = prompts(2, 12, 50)

    def slots_needed(n):  # the most live slots of any (layer, row, KV head) after generating n tokens
        cache = H.DMSCache(model)
        gen(model, ids, n=n, cache=cache)
        return max(int(x.max()) for x in cache.live_lengths())

    need = [slots_needed(n) for n in range(1, 13)]
    assert need[0] < 12 < need[-1]  # the prompt's survivors fit in fewer slots than its 12 tokens; decoding needs more
    gen(model, ids, n=1, cache=H.DMSCache(model, capacity=need[0]))  # the prefill needs room for survivors only
    with pytest.raises(CacheOverflowError, match=f"fixed capacity of {need[0] - 1} slots .* too small for this input"):
        gen(model, ids, n=1, cache=H.DMSCache(model, capacity=need[0] - 1))
    with pytest.raises(CacheOverflowError, match="ran out of slots during decoding.*fixed capacity 12"):
        gen(model, ids, n=12, cache=H.DMSCache(model, capacity=12), compile_config=_compile_everywhere())
    # an overflow at the last step, which no later step's check sees: generate() checks once more at the end
    n = max(i + 1 for i in range(1, 12) if need[i] > need[i - 1])
    with pytest.raises(CacheOverflowError, match="during decoding"):
        gen(model, ids, n=n, cache=H.DMSCache(model, capacity=need[n - 2]))
    gen(model, ids, n=n, cache=H.DMSCache(model, capacity=need[n - 1]))  # exactly enough: no error
    with pytest.raises(ValueError, match="initial_capacity .* or capacity .* not both"):
        H.DMSCache(model, initial_capacity=8, capacity=8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive number of slots"):
            H.DMSCache(model, capacity=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_capacity_cache_is_auto_compiled_on_cuda(dtype):
    """On CUDA generate() compiles a fixed-capacity DMSCache's decode steps by itself (its default
    CompileConfig: inductor, CUDA graphs), and decodes as the growable cache does eagerly."""
    from torch._dynamo.utils import counters

    _, model = make("llama", EVICTING["adapter"])
    model = model.to("cuda", dtype)
    ids = prompts(4, 40, 51).cuda()
    ref = gen(model, ids, n=24, cache=H.DMSCache(model))
    torch._dynamo.reset()
    counters.clear()
    cache = H.DMSCache(model, capacity=64)
    out = gen(model, ids, n=24, cache=cache)
    assert getattr(model, "_compiled_call", None) is not None  # transformers' auto-compile ran
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    cache.reset()
    again = gen(model, ids, n=24, cache=cache)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
        assert_close(stacked_logits(out), stacked_logits(ref), atol=1e-3)
    else:  # bf16: a near-tie may flip a late token; the first ones and the logits before it agree
        assert torch.equal(out.sequences[:, : 40 + 8], ref.sequences[:, : 40 + 8])
        assert_close(stacked_logits(out)[:, :8], stacked_logits(ref)[:, :8], atol=0.1)
    assert torch.equal(again.sequences, out.sequences)


def test_plain_forward_cache_and_gradients():
    _, model = make("llama", EVICTING["adapter"])
    ids = prompts(2, 10, 60)
    with torch.no_grad():
        out = model(ids)
        assert isinstance(cache_of(out), H.DMSCache) and cache_of(out).get_seq_length() == 10
        full = model(ids, use_cache=False).logits
    assert_close(out.logits, full)
    # with gradients and no cache: the differentiable full-sequence path, no cache
    out = model(ids, labels=ids)
    assert cache_of(out) is None
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    with pytest.raises(RuntimeError, match="inference cache"):
        model(ids, cache=H.DMSCache(model))


# ------------------------------------------------------------------------------------------------
# (f) the released format: save -> load, and folders written by the torchtune path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["borrowed", "adapter"])
def test_save_load_round_trip(decision, tmp_path):
    cfg = DMSConfig(window=6, decision=decision, alpha_scale=50.0, alpha_offset=1.5, final_cr=6.0)
    _, model = make("qwen3", cfg)
    H.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved["dms_alpha_scale"],
        saved["dms_initial_alpha_offset"],
        saved["dms_window_size"],
        saved["dms_cr"],
        saved["dms_decision"],
    ) == (50.0, 1.5, 6, 6.0, decision)
    assert "attn_implementation" not in saved and saved["architectures"] == ["Qwen3ForCausalLM"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    adapters = sorted(k for k in tensors if "dms" in k)
    if decision == "adapter":
        assert adapters == sorted(
            f"model.layers.{i}.self_attn.dms_adapter.{p}.weight" for i in range(2) for p in ("norm", "linear")
        )
    else:
        assert adapters == []
    loaded = H.from_pretrained(tmp_path)
    assert H.dms_config_of(loaded) == cfg and not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = prompts(1, 12, 70)
    assert torch.equal(gen(model, ids).sequences, gen(loaded, ids).sequences)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folder_written_by_the_torchtune_path_loads(arch, tmp_path):
    vanilla, _ = make(arch)
    vanilla.save_pretrained(tmp_path / "base")
    loaded = load_hf_checkpoint(tmp_path / "base")
    cfg = EVICTING["adapter"]
    tt = tm.add_dms(loaded.model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in tt.layers:
            layer.attn.dms_adapter.linear.weight.copy_(
                0.05 * torch.randn(layer.attn.dms_adapter.linear.weight.shape, generator=g)
            )
    save_hf_checkpoint(
        tt, {**loaded.hf_config, **cfg.to_hf()}, tmp_path / "dms", loaded.family, extra_state=dms_state_dict(tt)
    )
    model = H.from_pretrained(tmp_path / "dms")
    assert H.dms_config_of(model) == cfg
    seq = prompts(2, 24, 71)
    with torch.no_grad():
        want = tm.logits_of(tt, tm.forward_train(tt, seq, training=False).hidden)
        got = model(seq, use_cache=False).logits
        cached = model(seq).logits
    assert_close(got, want)
    assert_close(cached, want)
    assert 0.25 < eviction_fraction(model, seq) < 0.75


# ------------------------------------------------------------------------------------------------
# (g) errors
# ------------------------------------------------------------------------------------------------


def test_errors(tmp_path):
    vanilla, _ = make("llama")
    vanilla.save_pretrained(tmp_path / "plain")
    with pytest.raises(DMSConfigError, match="lacks the DMS keys.*dms_window_size.*dms_config=DMSConfig"):
        H.from_pretrained(tmp_path / "plain")
    with pytest.raises(DMSConfigError, match="lacks the DMS keys"):
        H.enable_dms(copy.deepcopy(vanilla))
    # an explicit DMSConfig makes any supported model a DMS model
    model = H.from_pretrained(tmp_path / "plain", dms_config=DMSConfig(window=4))
    assert H.dms_config_of(model).window == 4
    with pytest.raises(ValueError, match="no DMS adapter weights"):
        H.from_pretrained(tmp_path / "plain", dms_config=DMSConfig(decision="adapter"))

    cfg_path = tmp_path / "plain" / "config.json"
    base = json.loads(cfg_path.read_text())
    for key, value, field in [
        ("dms_window_size", -1, "window"),
        ("dms_alpha_scale", 0, "alpha_scale"),
        ("dms_initial_alpha_offset", float("nan"), "alpha_offset"),
        ("dms_decision", "neuron", "decision"),
    ]:
        bad = {**base, **DMSConfig().to_hf(), key: value}
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(DMSConfigError, match=rf"{key}=.*DMSConfig\.{field}="):
            H.from_pretrained(tmp_path / "plain")

    cfg_path.write_text(json.dumps({**base, **DMSConfig().to_hf(), "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        H.from_pretrained(tmp_path / "plain")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, bos_token_id=None, eos_token_id=None)
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported architectures: LlamaForCausalLM"):
        H.enable_dms(gpt2, DMSConfig())
    sliding = Qwen2ForCausalLM(
        Qwen2Config(**{**TINY, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0})
    )
    with pytest.raises(ValueError, match="sliding"):
        H.enable_dms(sliding, DMSConfig())
    with pytest.raises(FileNotFoundError):
        H.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a DMS model"):
        H.DMSCache(vanilla)
    _, model = make("llama", EVICTING["borrowed"])
    cache = H.DMSCache(model)
    gen(model, prompts(2, 5), cache=cache)
    with pytest.raises(ValueError, match="new DMSCache"):
        gen(model, prompts(3, 5), cache=cache)
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(-1)
    from transformers import StaticCache

    with pytest.raises(TypeError, match="not a StaticCache.*cache=dms_flex.hf.DMSCache"):
        gen(model, prompts(2, 5), cache=StaticCache(config=model.config, max_cache_len=16))


# ------------------------------------------------------------------------------------------------
# real weights: SmolLM2-135M-Instruct
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_hf_and_torchtune_paths_agree():
    from dms_flex.checkpoints import load_dms_state

    from .test_smollm2 import embedded_model_folder

    with pytest.MonkeyPatch.context() as mp:
        folder = embedded_model_folder(mp)
    cfg = DMSConfig(window=8, decision="adapter", alpha_scale=100.0, alpha_offset=10.0)
    model = H.enable_dms(LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32), cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.dms_adapter.linear.weight
            w.copy_(0.02 * torch.randn(w.shape, generator=g))
    tt = tm.add_dms(load_hf_checkpoint(folder, dtype=torch.float32).model, cfg)
    load_dms_state(tt, {k: v for k, v in model.state_dict().items() if "dms" in k})

    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    steps = torch.randint(0, model.config.vocab_size, (3, 1, 1), generator=g)
    cache = H.DMSCache(model)
    state = tm.InferenceState(tt, batch_size=1, max_seq_len=64)
    errors = []
    with torch.no_grad():
        pairs = [(model(ids, cache=cache, logits_to_keep=1).logits[:, -1], tm.prefill(tt, ids, state))]
        for tok in steps:
            pairs.append((model(tok, cache=cache).logits[:, -1], tm.decode_step(tt, tok, state)))
    for a, b in pairs:
        errors.append(((a - b).norm() / b.norm()).item())
    assert max(errors) < 1e-3, errors
    for layer, tt_cache in zip(cache.layers, state.caches):
        assert torch.equal(layer.live_lengths(), tt_cache.length)
    assert cache.compression().ratio > 1.2  # evictions happened


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: a tied output projection
def test_from_pretrained_lays_out_cpu_float32_weights_column_major(arch, tmp_path):
    """On the CPU in float32 the loaded model's Linear and Embedding weights are column-major (dms_flex.fusion,
    benchmarks/RESULTS.md section 33), a tied head stays tied, the DMS adapters stay contiguous, and it
    generates what the row-major model generates; after a dtype change `inference_layout` gives row-major back."""
    _, model = make(arch, EVICTING["adapter"])
    H.save_pretrained(model, tmp_path)
    loaded = H.from_pretrained(tmp_path)
    attn = loaded.model.layers[0].self_attn
    for w in (attn.q_proj.weight, attn.o_proj.weight, loaded.model.layers[1].mlp.down_proj.weight):
        assert w.stride(0) == 1, w.stride()
    assert loaded.lm_head.weight.stride(0) == 1
    assert attn.dms_adapter.linear.weight.is_contiguous()
    if arch == "qwen2":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = prompts(2, 14, 71)
    want, got = gen(model, ids, n=10), gen(loaded, ids, n=10)
    assert torch.equal(want.sequences, got.sequences)
    assert_close(stacked_logits(got), stacked_logits(want), atol=1e-4)
    loaded.double()
    H.inference_layout(loaded)
    assert all(p.is_contiguous() for p in loaded.parameters())
    if arch == "qwen2":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
