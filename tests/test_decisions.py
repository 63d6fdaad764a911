"""Decision sources, the shift and the training relaxation (docs/design.md, "Decision sources", "The shift",
"Training relaxation") against direct formulas."""

import math

import torch

from dms_flex import decisions
from dms_flex.config import DMSConfig


def test_borrowed_logits_read_last_channel_of_first_head_per_group():
    cfg = DMSConfig()
    q = torch.randn(2, 6, 5, 8)  # 6 q heads, 2 KV heads -> groups of 3; first heads are 0 and 3
    l = decisions.borrowed_logits(q, num_kv_heads=2, cfg=cfg)
    ref = torch.stack([q[:, 0, :, 7], q[:, 3, :, 7]], dim=1).double() * 100 - 5
    assert torch.allclose(l.double(), ref)
    z = decisions.zero_borrowed_channel(q, 2)
    assert (z[:, [0, 3], :, 7] == 0).all()
    others = torch.ones_like(q, dtype=torch.bool)
    others[:, [0, 3], :, 7] = False
    assert torch.equal(z[others], q[others])


def test_borrowed_channel_zeroed_before_and_after_rope_stays_out_of_attention():
    # after zeroing twice around a rotate-half RoPE the borrowed channel contributes nothing to q.k
    q = torch.randn(1, 2, 4, 8)
    zq = decisions.zero_borrowed_channel(q, 1)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)

    def rot(x):
        return x * cos + torch.cat([-x[..., 4:], x[..., :4]], -1) * sin

    once = rot(zq)
    assert (once[:, 0, :, 7] != 0).all()  # RoPE leaks the partner channel into D-1
    twice = decisions.zero_borrowed_channel(once, 1)
    assert (twice[:, 0, :, 7] == 0).all() and torch.equal(twice[:, 1], once[:, 1])


def test_adapter_starts_at_minus_offset_and_learns():
    cfg = DMSConfig(decision="adapter")
    ad = decisions.DMSAdapter(16, 3)
    x = torch.randn(2, 5, 16)
    l = ad(x, cfg)
    assert l.shape == (2, 3, 5) and torch.allclose(l, torch.full_like(l, -5.0))
    l.sum().backward()
    assert ad.linear.weight.grad.abs().sum() > 0
    # reference: Linear(RMSNorm(x))
    with torch.no_grad():
        ad.linear.weight.normal_()
        ref = (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ ad.linear.weight.t()
        assert torch.allclose(ad(x, cfg), ref.transpose(1, 2) * 100 - 5, atol=1e-3)


def test_adapter_one_token_form_matches_float64_reference_eager_and_compiled():
    # a compiled decode step takes DMSAdapter.one_token (one reduction, norm scale folded into the rows)
    cfg = DMSConfig(decision="adapter", alpha_offset=0.5)
    torch.manual_seed(0)
    ad = decisions.DMSAdapter(48, 3)
    with torch.no_grad():
        ad.linear.weight.normal_(0, 0.1)
        ad.norm.weight.uniform_(0.2, 2.0)
    x = torch.randn(5, 1, 48, dtype=torch.bfloat16) * 3
    x64, w64, g64 = x.double(), ad.linear.weight.double(), ad.norm.weight.double()
    ref = (x64 / x64.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * g64) @ w64.t()  # (B, 1, Hkv)
    ref = ref.transpose(1, 2) * 100 - 0.5
    with torch.no_grad():
        direct = ad.one_token(x).transpose(1, 2) * 100 - 0.5
        compiled = torch.compile(lambda t: ad(t, cfg), backend="aot_eager", fullgraph=True)(x)
        eager = ad(x, cfg)  # the two-module form
    for got in (direct, compiled, eager):
        assert got.dtype == torch.float32 and got.shape == (5, 3, 1)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-4)
    # the compiled form is the one-token form (same summation), not the two-module one
    torch.testing.assert_close(compiled, direct, rtol=0, atol=1e-6)


def test_shift_next_token_decides_and_documents_end_with_keep():
    l = torch.arange(10.0).reshape(1, 1, 10) - 4  # positive from position 5 on
    s = decisions.shift_to_decided_token(l)
    assert torch.equal(s[..., :-1], l[..., 1:]) and s[..., -1] == decisions.KEEP_LOGIT
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    sd = decisions.shift_to_decided_token(l, docs)
    assert sd[0, 0, 2] == decisions.KEEP_LOGIT and sd[0, 0, 6] == decisions.KEEP_LOGIT
    assert sd[0, 0, 5] == l[0, 0, 6]


def test_per_layer_scope_broadcasts_head_zero():
    l = torch.randn(2, 4, 7)
    out = decisions.apply_scope(l, DMSConfig(scope="layer"))
    assert torch.equal(out, l[:, :1].expand(2, 4, 7))
    assert torch.equal(decisions.apply_scope(l, DMSConfig()), l)


def test_eval_has_no_noise_and_hard_rule():
    l = torch.randn(3, 2, 50)
    lk1, a1 = decisions.relax(l, DMSConfig(), training=False)
    lk2, a2 = decisions.relax(l, DMSConfig(), training=False)
    assert torch.equal(lk1, lk2) and torch.equal(a1, (l > 0).float())
    assert torch.equal(torch.isinf(lk1), l > 0) and (lk1[l <= 0] == 0).all()


def test_training_relaxation_distribution_and_straight_through():
    cfg = DMSConfig(tau=0.1)
    l = torch.full((1, 1, 200_000), 0.7, requires_grad=True)
    lk, a_st = decisions.relax(l, cfg, training=True, generator=torch.Generator().manual_seed(1))
    # alpha > 0.5 iff l + n > 0; n ~ Logistic(0,1) so P = sigmoid(l)
    assert abs(float(a_st.mean()) - 1 / (1 + math.exp(-0.7))) < 0.005
    assert set(a_st.detach().unique().tolist()) <= {0.0, 1.0}
    a_st.sum().backward()
    assert (l.grad >= 0).all() and l.grad.sum() > 0  # straight-through: d alpha / d l > 0
    # log_keep is log(1 - alpha) with the same noise sample
    alpha = torch.sigmoid(torch.logit(1 - lk.exp().double().clamp(1e-12, 1 - 1e-12)))
    assert torch.equal((alpha > 0.5).float(), a_st.detach().double().float())
