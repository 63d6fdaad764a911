"""Compression and distillation losses (docs/design.md, "Losses and schedule") against direct formulas."""

import pytest
import torch

from dms_flex import losses


def test_compression_loss_value_and_gradient_sign():
    a = [
        torch.tensor([[[0.0, 1.0, 0.0, 0.0]]], requires_grad=True),
        torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], requires_grad=True),
    ]
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


def test_chunked_kd_uses_the_teachers_own_output_projection():
    s, t = torch.randn(1, 9, 8, dtype=torch.float64), torch.randn(1, 9, 8, dtype=torch.float64)
    W_s, W_t = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    got = losses.chunked_kd_loss(s, t, W_s, mask, chunk_size=4, teacher_output_weight=W_t)
    ref = losses.kd_loss_from_logits(s @ W_s.t(), t @ W_t.t(), mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
