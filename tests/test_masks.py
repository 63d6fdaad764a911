"""The attention rule (docs/design.md, "Delayed eviction", "Training relaxation"): hard masks, the soft training
bias and the prefill reference against independent float64 loops on small shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from dms_flex import attention, decisions, masks
from dms_flex.config import DMSConfig


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
    return (
        torch.randn(B, Hq, T, D, dtype=dtype),
        torch.randn(B, Hkv, T, D, dtype=dtype),
        torch.randn(B, Hkv, T, D, dtype=dtype),
    )


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
    assert rel_err(out, naive_attention(q, k, v, bias, 8**-0.5)) < 1e-10
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
        return float(
            math.log(1 - 1 / (1 + math.exp(-float(nxt + noise[b, h, j]) / 0.1)))
            if float(nxt + noise[b, h, j]) / 0.1 < 30
            else -float(nxt + noise[b, h, j]) / 0.1
        )

    out = attention.dms_attention(q, k, v, lk, w, doc_ids=docs, backend="dense")
    assert rel_err(out, naive_attention(q, k, v, bias, 8**-0.5)) < 1e-8


def test_flex_forward_matches_dense_on_cpu():
    B, Hq, Hkv, T, D, w = 2, 4, 2, 64, 16, 7
    q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype=torch.float32)
    docs = torch.cat([torch.zeros(B, 40, dtype=torch.long), torch.ones(B, 24, dtype=torch.long)], 1)
    decided = decisions.shift_to_decided_token(torch.randn(B, Hkv, T), docs)
    lk, _ = decisions.relax(decided, DMSConfig(), training=True)
    dense = attention.dms_attention(q, k, v, lk, w, doc_ids=docs, backend="dense")
    flex = attention.flex_dms_attention(q, k, v, lk, w, doc_ids=docs, compiled=False)
    assert rel_err(flex, dense) < 1e-5


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
            s = (q[b, h] @ k[b, h // (Hq // Hkv)].T) * D**-0.5
            ref = torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ v[b, h // (Hq // Hkv)]
            assert rel_err(got[b, h], ref) < 1e-12
