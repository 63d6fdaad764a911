"""CUDA checks (skipped on CPU): flex DMS attention forward/backward against the dense reference,
and compact-cache generation under CUDA graphs against the teacher-forced forward."""

import pytest
import torch

from dms_flex import attention, decisions
from dms_flex.config import DMSConfig

pytestmark = pytest.mark.gpu


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("window", [0, 256])
def test_flex_matches_dense_reference_forward_backward_bf16(window):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 1, 8, 2, 4096, 64
    dev = "cuda"
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(B, Hkv, T, device=dev, requires_grad=True)
    # packed documents with boundaries not on block multiples
    doc_ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    for start in (1000, 2500, 3333):
        doc_ids[:, start:] += 1
    noise = decisions.logistic_noise((B, Hkv, T), dev)
    cfg = DMSConfig(window=window)

    def run(backend):
        decided = decisions.shift_to_decided_token(logits, doc_ids)
        lk, _ = decisions.relax(decided, cfg, training=True, noise=noise)
        out = attention.dms_attention(q, k, v, lk, window, doc_ids=doc_ids, backend=backend)
        g = torch.randn_like(out, generator=None)
        return out, g

    torch.manual_seed(1)
    out_f, g = run("flex")
    grads_f = torch.autograd.grad(out_f, (q, k, v, logits), g)
    # reference in float32 from the same bf16 inputs
    qs, ks, vs = (t.detach().float().requires_grad_() for t in (q, k, v))
    decided = decisions.shift_to_decided_token(logits, doc_ids)
    lk, _ = decisions.relax(decided, cfg, training=True, noise=noise)
    out_r = attention.dense_dms_attention(qs, ks, vs, lk, window, doc_ids=doc_ids)
    grads_r = torch.autograd.grad(out_r, (qs, ks, vs, logits), g.float())
    assert rel(out_f, out_r) < 1e-2
    for name, a, b in zip("q k v logits".split(), grads_f, grads_r):
        assert rel(a, b) < 2e-2, name
    print(
        f"window {window}: out rel {rel(out_f, out_r):.2e}; grads rel "
        + " ".join(f"{n} {rel(a, b):.2e}" for n, a, b in zip("q k v logits".split(), grads_f, grads_r))
    )


@pytest.mark.parametrize(
    "decision,heads,embed,scope,fused",
    [
        ("borrowed", (4, 2), 32, "head", False),  # head dim 8: the separate RoPE and update
        ("borrowed", (4, 2), 64, "head", True),  # head dim 16: decisions, RoPE and update in one kernel
        ("adapter", (4, 2), 64, "head", True),
        ("adapter", (4, 2), 64, "layer", True),
        ("adapter", (4, 1), 32, "layer", False),
    ],
)
def test_cuda_graph_generation_matches_teacher_forced(decision, heads, embed, scope, fused):
    from dms_flex import torchtune_model as tm

    from .helpers import assert_matches_reference, greedy_cached, tiny_model

    m = tiny_model(window=3, max_seq_len=256, decision=decision, heads=heads, embed_dim=embed, scope=scope).cuda()
    prompt = torch.randint(0, 64, (2, 30), device="cuda")
    assert tm._rope_in_update(m, prompt[:, :1], 256) == fused
    state = tm.InferenceState(m, 2)
    compiled = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        full, logits, state = greedy_cached(m, prompt, 60, state, step=lambda *a: compiled(*a).clone())
        assert_matches_reference(m, full, logits, 30, state, atol=5e-3, rtol=5e-3, backend="dense")


def test_first_prefill_kernel_matches_dense_for_many_prompt_shapes():
    """The first prefill's Triton kernel (hard rule as a 0 / -inf bias) across many prompt shapes:
    every result matches the dense reference."""
    torch.manual_seed(0)
    Hq, Hkv, D, w = 9, 3, 64, 64
    shapes = [(1, 100), (3, 333), (2, 1024), (16, 257), (4, 2049), (1, 4000), (5, 77), (8, 640), (2, 1500), (7, 129)]
    for B, T in shapes:
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
        evicted = torch.rand(B, Hkv, T, device="cuda") > 0.5
        got = attention.dms_hard_attention(q, k, v, evicted, w)
        ref = attention.dms_hard_attention(q.float(), k.float(), v.float(), evicted, w, backend="dense")
        assert rel(got, ref) < 1e-2, (B, T)


def test_compiled_prefill_equals_eager():
    """prefill(compile=True) (torch.compile'd layer halves, dynamic shapes) gives the eager logits and
    cache for several prompt lengths and chunkings, and did not fall back."""
    from dms_flex import torchtune_model as tm
    from tests.helpers import tiny_model

    torch.manual_seed(0)
    m = tiny_model(window=8, heads=(4, 2), max_seq_len=256).cuda()
    for n, chunk in ((50, None), (77, 32), (130, 64)):
        prompt = torch.randint(0, 64, (2, n), device="cuda")
        eager, comp = tm.InferenceState(m, 2, max_seq_len=256), tm.InferenceState(m, 2, max_seq_len=256)
        a = tm.prefill(m, prompt, eager, chunk_size=chunk)
        b = tm.prefill(m, prompt, comp, chunk_size=chunk, compile=True)
        assert tm._PREFILL_COMPILE["ok"]
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), float((a - b).abs().max())
        for c1, c2 in zip(eager.caches, comp.caches):
            assert torch.equal(c1.length, c2.length)


@pytest.mark.parametrize("fuse", [False, True])
def test_graphed_generation_loop_equals_the_eager_loop_over_turns(fuse):
    """generate_tokens(cuda_graph=True): the compiled step and its sampling replayed from one CUDA graph
    (dms_flex/stepping.py), with the lookahead loop and fused projections, gives the eager loop's tokens
    and caches over several turns (stop-ended turns and empty-prompt continuations included), and the
    graph is captured once and reused by later calls."""
    from dms_flex import fusion, stepping
    from dms_flex import torchtune_model as tm
    from dms_flex.generate import generate_tokens

    from .helpers import tiny_model

    m = tiny_model(window=3, max_seq_len=256).cuda()
    ref = tiny_model(window=3, max_seq_len=256).cuda()
    if fuse:
        fusion.fuse_projections(m)
    torch._dynamo.reset()
    step = torch.compile(tm.decode_step, fullgraph=True)
    g, e = tm.InferenceState(m, 1), tm.InferenceState(ref, 1)
    graphs = set()
    for turn in range(6):
        prompt = [[1 + turn, 2, 3]] if turn % 3 != 2 else [[]]
        stops = [5, 33, 42, 16] if turn % 2 else ()
        a = generate_tokens(m, prompt, g, max_new_tokens=9, stop_tokens=stops, step_fn=step, cuda_graph=True)
        b = generate_tokens(ref, prompt, e, max_new_tokens=9, stop_tokens=stops)
        assert a.tokens == b.tokens and a.stopped == b.stopped, turn
        assert torch.equal(g.next_pos, e.next_pos)
        for cg, ce in zip(g.caches, e.caches):
            assert torch.equal(cg.length, ce.length)
        graphs |= {id(s.graph) for s in g.__dict__["_graphed_steppers"].values() if s.graph is not None}
    assert len(graphs) == 2  # one per (sampling, stop tokens) configuration, reused across turns
    assert isinstance(next(iter(g.__dict__["_graphed_steppers"].values())), stepping.GraphedStepper)
