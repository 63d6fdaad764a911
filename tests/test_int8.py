"""int8 KV cache on top of DMS, and weight-only quantization, against references that quantize the
same way."""

import pytest
import torch
import torch.nn.functional as F

from dms_flex import quant
from dms_flex import torchtune_model as tm

from .helpers import assert_matches_reference, greedy_cached, tiny_model


def test_quantize_kv_is_symmetric_per_token_and_head():
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64).float() * torch.rand(2, 3, 7, 1) * 5
    q, s = quant.quantize_kv(x)
    ref_s = x.abs().amax(-1).double() / 127.5  # symmetric: (127 - (-128)) / 2
    ref_q = torch.clamp(torch.round(x.double() / ref_s[..., None]), -128, 127)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 7)
    assert torch.allclose(s.double(), ref_s, rtol=1e-6)
    assert (q.double() - ref_q).abs().max() <= 1  # rounding at exact .5 ties may differ by one step
    assert (quant.dequantize_kv(q, s) - x).abs().max() <= s.max() * 0.5 + 1e-6


def test_fake_quant_has_straight_through_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    y = quant.fake_quantize_kv(x)
    q, s = quant.quantize_kv(x.detach())
    assert torch.equal(y.detach(), quant.dequantize_kv(q, s))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("window", [0, 3])
def test_int8_cache_generation_equals_fake_quant_reference(window):
    m = tiny_model(window=window)
    prompt = torch.randint(0, 64, (2, 20))
    state = tm.InferenceState(m, 2, kv_dtype=torch.int8)
    assert state.caches[0].k.dtype == torch.int8
    full, logits, state = greedy_cached(m, prompt, 12, state)
    # K/V computed token by token vs over the full sequence differ by float rounding, which can move
    # a value across an int8 rounding boundary: one quantization step (~amax/127) in one channel
    assert_matches_reference(m, full, logits, 20, state, atol=5e-3, rtol=1e-3, kv_int8=True)
    # accounting: one int8 byte per channel plus a float32 scale per token, K and V
    D = state.caches[0].k.shape[-1]
    assert state.caches[0].bytes_per_slot() == 2 * (D + 4)


def test_int8_kv_is_close_to_full_precision_with_and_without_dms():
    for offset, window in ((50.0, 4), (0.0, 4)):  # DMS effectively off, then evicting
        m = tiny_model(window=window, offset=offset)
        toks = torch.randint(0, 64, (2, 40))
        with torch.no_grad():
            a = tm.logits_of(m, tm.forward_train(m, toks, training=False).hidden)
            b = tm.logits_of(m, tm.forward_train(m, toks, training=False, kv_int8=True).hidden)
        kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
        assert 0 < float(kl.mean()) < 2e-3


def test_bad_kv_dtype_is_a_clear_error():
    m = tiny_model()
    with pytest.raises(ValueError, match="kv_dtype=torch.float16 is not supported"):
        tm.InferenceState(m, 1, kv_dtype=torch.float16)


def test_weight_only_int8_composes_with_dms():
    m = tiny_model(window=3)
    toks = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        ref = tm.logits_of(m, tm.forward_train(m, toks, training=False).hidden)
    quant.quantize_weights(m, "int8")
    assert type(m.layers[0].attn.q_proj.weight).__name__ == "AffineQuantizedTensor"
    state = tm.InferenceState(m, 1)
    with torch.no_grad():
        got = tm.prefill(m, toks, state)
    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(ref[:, -1], -1), log_target=True, reduction="sum")
    assert float(kl) < 1e-2
    with pytest.raises(ValueError, match="not one of"):
        quant.quantize_weights(m, "int3")
