"""Fused q/k/v and gate/up projections (dms_flex/fusion.py) against the unfused modules."""

import copy

import pytest
import torch

from dms_flex import fusion
from dms_flex import torchtune_model as tm

from .helpers import greedy_cached, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("decision", ["borrowed", "adapter"])
def test_fused_model_equals_the_unfused_one(family, decision):
    m = tiny_model(family=family, decision=decision).double()
    ref = copy.deepcopy(m)
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    assert fusion.fuse_projections(m) == len(m.layers)
    # the module tree, the state-dict names and values are torchtune's
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    attn = m.layers[0].attn
    assert attn.q_proj.weight.data_ptr() == attn.dms_qkv_weight.data_ptr()
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    out = tm.forward_train(m, tokens, training=False)
    want = tm.forward_train(ref, tokens, training=False)
    torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(out.evicted, want.evicted))
    # the cached path (prefill + decode steps) too
    toks, logits, _ = greedy_cached(m, tokens[:1, :9], 8)
    toks_ref, logits_ref, _ = greedy_cached(ref, tokens[:1, :9], 8)
    assert torch.equal(toks, toks_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-12, atol=1e-12)


def test_loading_a_state_dict_writes_through_to_the_fused_buffer():
    m = tiny_model()
    other = tiny_model(seed=1)
    fusion.fuse_projections(m)
    m.load_state_dict(other.state_dict())
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        tm.forward_train(m, tokens, training=False).hidden, tm.forward_train(other, tokens, training=False).hidden
    )
    w = m.layers[1].mlp.dms_w13_weight
    assert torch.equal(w[: w.shape[0] // 2], other.layers[1].mlp.w1.weight)


def test_replaced_weights_are_detected_and_not_fused():
    m = tiny_model()
    fusion.fuse_projections(m)
    attn = m.layers[0].attn
    assert fusion.fused_is_current(attn, "dms_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
    m.to(torch.float64)  # a move copies parameters and buffers apart: the fused buffer goes stale
    assert not fusion.fused_is_current(attn, "dms_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
    fusion.unfuse_stale(m)
    assert "dms_qkv_weight" not in attn._buffers and "dms_w13_weight" not in m.layers[0].mlp._buffers
    ref = tiny_model().double()
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        tm.forward_train(m, tokens, training=False).hidden, tm.forward_train(ref, tokens, training=False).hidden
    )
    # wrapped projections (e.g. LoRA) or mixed dtypes are left alone
    m2 = tiny_model()
    m2.layers[0].attn.k_proj.to(torch.float64)
    m2.layers[0].attn.k_proj.__class__ = type("Wrapped", (torch.nn.Linear,), {})
    assert fusion.fuse_projections(m2) == 1
    assert "dms_qkv_weight" not in m2.layers[0].attn._buffers


def test_fused_decode_step_traces_whole_under_torch_compile():
    """fullgraph=True: the fused lookup is traced, not a graph break (the CUDA-graph step needs that).
    Autograd is left on here: the compiled step once returned wrong logits unless called under no_grad."""
    m = tiny_model(decision="adapter")
    fusion.fuse_projections(m)
    torch._dynamo.reset()
    step = torch.compile(tm.decode_step, fullgraph=True, backend="aot_eager")
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    toks, logits, _ = greedy_cached(m, prompt, 5)
    toks_c, logits_c, _ = greedy_cached(m, prompt, 5, step=step)
    assert torch.equal(toks, toks_c)
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)


def test_a_copied_or_moved_fused_model_is_fused_again_by_the_next_state():
    """deepcopy / .to() copy parameters apart from the fused buffer; InferenceState re-fuses, so later
    edits of the parameters are what the step computes with."""
    m = tiny_model()
    fusion.fuse_projections(m)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.layers[0].attn.k_proj.weight.mul_(2.0)
        c.layers[1].mlp.w3.weight.zero_()
    ref = copy.deepcopy(c)
    fusion.unfuse_stale(ref)  # plain modules: the reference
    assert "dms_qkv_weight" not in ref.layers[0].attn._buffers
    tm.InferenceState(c, 1)
    attn = c.layers[0].attn
    assert fusion.fused_is_current(attn, "dms_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
    prompt = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    toks, logits, _ = greedy_cached(c, prompt, 4)
    toks_ref, logits_ref, _ = greedy_cached(ref, prompt, 4)
    assert torch.equal(toks, toks_ref)
    torch.testing.assert_close(logits, logits_ref)


def test_forward_train_stops_using_a_fused_buffer_whose_projection_was_replaced():
    """A projection swapped after fusing (as quantization or a LoRA wrap does) is what runs next."""
    m = tiny_model()
    fusion.fuse_projections(m)
    new = torch.nn.Linear(32, m.layers[0].attn.k_proj.weight.shape[0], bias=False)
    torch.nn.init.normal_(new.weight, 0, 0.3)
    m.layers[0].attn.k_proj = new
    ref = tiny_model()
    ref.layers[0].attn.k_proj = copy.deepcopy(new)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        tm.forward_train(m, tokens, training=False).hidden, tm.forward_train(ref, tokens, training=False).hidden
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("output", ["untied", "tied", "shared"])
def test_cpu_float32_weights_are_column_major_and_compute_the_same(family, output):
    """On the CPU in float32 every plain projection weight is stored column-major (same values, shape and
    state dict; torchtune's TiedLinear and a Parameter shared with the embedding stay tied), and the model
    computes what the float64 reference computes; float64 keeps the row-major layout."""
    from torchtune.modules import TiedLinear

    m = tiny_model(family=family, decision="adapter")
    if output == "tied":  # as torchtune's tied builders set it up (not a module)
        del m.output
        m.output = TiedLinear(m.tok_embeddings)
    elif output == "shared":
        m.output = torch.nn.Linear(32, 64, bias=False)
        m.output.weight = m.tok_embeddings.weight
    ref = copy.deepcopy(m).double()
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    fusion.fuse_projections(m)
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    vocab = m.tok_embeddings if output == "tied" else m.output
    weights = [vocab.weight, m.tok_embeddings.weight]
    for layer in m.layers:
        weights += [layer.attn.dms_qkv_weight, layer.attn.q_proj.weight, layer.attn.output_proj.weight]
        weights += [layer.mlp.dms_w13_weight, layer.mlp.w3.weight, layer.mlp.w2.weight]
    for w in weights if output != "untied" else weights[:1] + weights[2:]:
        assert w.stride(0) == 1 and w.stride(1) >= w.shape[0], w.stride()  # a view keeps its buffer's strides
    if output == "untied":  # read by index only: left as it is
        assert m.tok_embeddings.weight.is_contiguous()
    if output == "tied":
        assert m.output.tied_module is m.tok_embeddings
    if output == "shared":
        assert m.output.weight is m.tok_embeddings.weight
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    out = tm.forward_train(m, tokens, training=False)
    want = tm.forward_train(ref, tokens, training=False)
    torch.testing.assert_close(out.hidden.double(), want.hidden, rtol=1e-5, atol=1e-5)
    toks, logits, _ = greedy_cached(m, tokens[:1, :9], 8)
    toks_ref, logits_ref, _ = greedy_cached(ref, tokens[:1, :9], 8)
    assert torch.equal(toks, toks_ref)
    torch.testing.assert_close(logits.double(), logits_ref, rtol=1e-4, atol=1e-4)
    # float64 (like every dtype but float32, and every CUDA tensor) keeps torch's row-major layout
    fusion.fuse_projections(ref)
    assert ref.layers[0].attn.dms_qkv_weight.stride() == (32, 1)
    assert ref.layers[0].mlp.w2.weight.stride() == (ref.layers[0].mlp.w2.weight.shape[1], 1)
    # and a fused float32 model moved to float64 (a move keeps strides) gets it back with its next
    # InferenceState (fusion.refresh), as when it is fused again
    m.double()
    tm.InferenceState(m, 1)
    for w in (m.layers[1].attn.dms_qkv_weight, m.layers[1].mlp.w2.weight, vocab.weight, m.tok_embeddings.weight):
        assert w.is_contiguous(), w.stride()
    if output == "shared":
        assert m.output.weight is m.tok_embeddings.weight
    toks64, _, _ = greedy_cached(m, tokens[:1, :9], 8)
    assert torch.equal(toks64, toks_ref)


def test_a_model_never_fused_keeps_its_parameters():
    """refresh (every InferenceState and forward_train) lays out weights only of a model that was fused: a model
    being trained keeps the very Parameters its optimizer holds, row-major."""
    m = tiny_model(decision="adapter")
    before = {name: p for name, p in m.named_parameters()}
    tm.InferenceState(m, 1)
    tm.forward_train(m, torch.randint(0, 64, (1, 8)), training=False)
    after = dict(m.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(p.is_contiguous() for p in after.values())
