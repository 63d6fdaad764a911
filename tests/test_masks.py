"""DMS rules (docs/design.md, "Semantics") against independent float64 loops on small shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from dms_flex import attention, decisions, losses, masks, stats
from dms_flex.config import DMSConfig, DMSConfigError


# ----------------------------------------------------------------------------- naive references
def naive_attention(q, k, v, bias_fn, scale):
    """float64 loop: out[b,h,i] = softmax_j(q.k*scale + bias_fn(b, h, i, j)) v; bias None = masked."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                scores, vals = [], []
                for j in range(T):
                    bias = bias_fn(b, h // G, i, j)
                    if bias is None:
                        continue
                    scores.append(float(q[b, h, i] @ k[b, h // G, j]) * scale + bias)
                    vals.append(v[b, h // G, j])
                p = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[b, h, i] = sum(pi * vj for pi, vj in zip(p, vals))
    return out


def marks_from_logits(logits):
    """Token t is marked iff the logit at position t+1 is positive (the next token decides)."""
    B, H, T = logits.shape
    m = torch.zeros(B, H, T, dtype=torch.bool)
    m[..., :-1] = logits[..., 1:] > 0
    return m


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def rand_qkv(B=2, Hq=4, Hkv=2, T=13, D=8, dtype=torch.float64):
    return (torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype),
            torch.randn(B, Hkv, T, D, dtype=dtype))


# ----------------------------------------------------------------------------- config
def test_config_defaults_match_released_checkpoint():
    cfg = DMSConfig()
    assert (cfg.alpha_scale, cfg.alpha_offset, cfg.window, cfg.tau) == (100.0, 5.0, 512, 0.1)
    assert DMSConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("window", -1, "window=-1"), ("window", 2.5, "integer >= 0"), ("decision", "neuron", "borrowed"),
    ("tau", 0.0, "> 0"), ("alpha_scale", float("nan"), "finite"), ("scope", "token", "head"),
    ("initial_cr", 0.5, ">= 1"), ("final_step", -3, "final_step=-3"),
])
def test_config_errors_name_field_value_range(field, value, needle):
    with pytest.raises(DMSConfigError) as e:
        DMSConfig(**{field: value})
    assert f"DMSConfig.{field}=" in str(e.value) and needle in str(e.value)


def test_config_final_cr_below_initial_and_unknown_field():
    with pytest.raises(DMSConfigError, match="final_cr=2.0.*>= initial_cr"):
        DMSConfig(initial_cr=4.0, final_cr=2.0)
    with pytest.raises(DMSConfigError, match="unknown DMSConfig field"):
        DMSConfig().replace(windw=3)
    with pytest.raises(DMSConfigError, match="lacks the DMS keys"):
        DMSConfig.from_hf({"dms_cr": 8})


def test_cr_schedule_endpoints_and_linearity():
    cfg = DMSConfig(initial_cr=1, final_cr=16, final_step=510)
    assert cfg.target_cr(0) == 1 and cfg.target_cr(510) == 16 and cfg.target_cr(10_000) == 16
    assert cfg.target_cr(255) == pytest.approx(8.5)
    assert cfg.alpha_target(0) == 0 and cfg.alpha_target(510) == pytest.approx(1 - 1 / 16)
    assert abs(cfg.target_cr(238) - 8.0) < 0.03  # docs/design.md, "Losses and schedule": CR 8 at about step 238
    assert cfg.replace(immediate_eviction=True).effective_window == 0


# ----------------------------------------------------------------------------- decision sources
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


# ----------------------------------------------------------------------------- attention rule
def test_window_boundary_hard_mask_matches_loop():
    w = 3
    B, Hq, Hkv, T = 2, 4, 2, 13
    q, k, v = rand_qkv(B, Hq, Hkv, T)
    logits = torch.randn(B, Hkv, T) * 3
    decided = decisions.shift_to_decided_token(logits)
    log_keep, _ = decisions.relax(decided, DMSConfig(window=w), training=False)
    marked = marks_from_logits(logits)

    def bias(b, h, i, j):
        if j > i or (marked[b, h, j] and i - j > w):
            return None
        return 0.0

    out = attention.dms_attention(q, k, v, log_keep, w, backend="dense")
    assert rel_err(out, naive_attention(q, k, v, bias, 8 ** -0.5)) < 1e-10
    # the boundary itself: i - j = w visible, w + 1 not, for a marked key
    j = int(torch.nonzero(marked[0, 0, : T - w - 1])[0])
    qp, kp = torch.tensor(j + w), torch.tensor(j)
    assert masks.visible(qp, kp, torch.tensor(True), w)
    assert not masks.visible(qp + 1, kp, torch.tensor(True), w)
    assert masks.visible(qp + 1, kp, torch.tensor(False), w)


@pytest.mark.parametrize("w", [0, 2, 5])
def test_soft_training_bias_gqa_and_documents_match_loop(w):
    B, Hq, Hkv, T = 2, 6, 2, 11
    q, k, v = rand_qkv(B, Hq, Hkv, T)
    logits = torch.randn(B, Hkv, T, dtype=torch.float64)
    docs = torch.tensor([[0] * 6 + [1] * 5, [0] * 3 + [1] * 8])
    noise = decisions.logistic_noise((B, Hkv, T), "cpu").double()
    decided = decisions.shift_to_decided_token(logits, docs)
    lk = F.logsigmoid(-(decided + noise) / 0.1)

    def bias(b, h, i, j):
        if j > i or docs[b, i] != docs[b, j]:
            return None
        if i - j <= w:
            return 0.0
        nxt = logits[b, h, j + 1]  # same document here, so j + 1 exists and decides j
        return float(math.log(1 - 1 / (1 + math.exp(-float(nxt + noise[b, h, j]) / 0.1))) if float(
            nxt + noise[b, h, j]) / 0.1 < 30 else -float(nxt + noise[b, h, j]) / 0.1)

    out = attention.dms_attention(q, k, v, lk, w, doc_ids=docs, backend="dense")
    assert rel_err(out, naive_attention(q, k, v, bias, 8 ** -0.5)) < 1e-8


def test_flex_forward_matches_dense_on_cpu():
    B, Hq, Hkv, T, D, w = 2, 4, 2, 64, 16, 7
    q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype=torch.float32)
    docs = torch.cat([torch.zeros(B, 40, dtype=torch.long), torch.ones(B, 24, dtype=torch.long)], 1)
    decided = decisions.shift_to_decided_token(torch.randn(B, Hkv, T), docs)
    lk, _ = decisions.relax(decided, DMSConfig(), training=True)
    dense = attention.dms_attention(q, k, v, lk, w, doc_ids=docs, backend="dense")
    flex = attention.flex_dms_attention(q, k, v, lk, w, doc_ids=docs, compiled=False)
    assert rel_err(flex, dense) < 1e-5


# ----------------------------------------------------------------------------- losses
def test_compression_loss_value_and_gradient_sign():
    a = [torch.tensor([[[0.0, 1.0, 0.0, 0.0]]], requires_grad=True),
         torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], requires_grad=True)]
    loss = losses.compression_loss(a, alpha_target=0.5)
    assert loss.item() == pytest.approx(0.5 - 1 / 8)
    loss.backward()
    assert (a[0].grad < 0).all()  # more eviction lowers the loss
    over = [torch.ones(1, 1, 4, requires_grad=True)]
    l2 = losses.compression_loss(over, alpha_target=0.5)
    l2.backward()
    assert l2.item() == 0 and (over[0].grad == 0).all()  # one-sided


def test_fraction_evicted_ignores_padding():
    a = [torch.tensor([[[1.0, 0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]])]
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.allclose(losses.fraction_evicted(a, valid), torch.tensor([0.5, 0.5]))


def test_chunked_kd_equals_unchunked_value_and_grad():
    B, T, d, V = 2, 37, 16, 50
    s = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, d, dtype=torch.float64)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, -5:] = -100
    labels[1, 3] = 7
    mask = losses.distillation_mask(labels, eos_ids=[7])
    assert not mask[0, -1] and not mask[1, 3]
    ch = losses.chunked_kd_loss(s, t, W, mask, chunk_size=8)
    ref = losses.kd_loss_from_logits(s @ W.t(), t @ W.t(), mask)
    # independent KL formula
    ps, pt = torch.softmax(s @ W.t(), -1), torch.softmax(t @ W.t(), -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    assert ref.item() == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-10)
    assert ch.item() == pytest.approx(ref.item(), rel=1e-10)
    g1 = torch.autograd.grad(ch, (s, W))
    g2 = torch.autograd.grad(ref, (s, W))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10)
    assert ch.item() > 0
    assert losses.chunked_kd_loss(t, t, W, mask).item() == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------- statistics
def test_kept_fraction_counts_window_as_retained():
    w = 2
    ev = torch.tensor([[[True, False, True, True, True, True]]])
    # last token at index 5; far tokens are 0..2 (5 - t > 2): marked 0 and 2 are gone -> 4 of 6 kept
    assert torch.allclose(stats.kept_fraction(ev, w), torch.tensor([[4 / 6]]))
    # with lengths: row of 4 tokens -> last=3, far = {0}: 3 of 4 kept
    assert torch.allclose(stats.kept_fraction(ev, w, torch.tensor([4])), torch.tensor([[3 / 4]]))
    rep = stats.compression_report([torch.tensor([[0.25, 0.5]]), torch.tensor([[0.25, 0.0 + 0.125]])])
    assert rep.ratio == pytest.approx(1 / ((0.25 + 0.5 + 0.25 + 0.125) / 4))
    assert len(rep.per_layer_ratio) == 2 and "CR" in rep.format()


def test_chunked_kd_uses_the_teachers_own_output_projection():
    s, t = torch.randn(1, 9, 8, dtype=torch.float64), torch.randn(1, 9, 8, dtype=torch.float64)
    W_s, W_t = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    got = losses.chunked_kd_loss(s, t, W_s, mask, chunk_size=4, teacher_output_weight=W_t)
    ref = losses.kd_loss_from_logits(s @ W_s.t(), t @ W_t.t(), mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)


def test_hard_prefill_attention_dense_matches_the_rule():
    """dms_hard_attention's reference path equals plain softmax over the keys `masks.visible` allows."""
    B, Hq, Hkv, T, D, w = 2, 4, 2, 40, 16, 5
    q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype=torch.float64)
    evicted = torch.rand(B, Hkv, T) > 0.4
    got = attention.dms_hard_attention(q, k, v, evicted, w, backend="dense")
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for b in range(B):
        for h in range(Hq):
            vis = masks.visible(i, j, evicted[b, h // (Hq // Hkv)][None, :], w)
            s = (q[b, h] @ k[b, h // (Hq // Hkv)].T) * D ** -0.5
            ref = torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v[b, h // (Hq // Hkv)]
            assert rel_err(got[b, h], ref) < 1e-12
