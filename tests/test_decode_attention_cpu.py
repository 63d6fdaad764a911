"""The CPU decode attention (kernels/reference.py `decode_attention_dense`, eager branch: the used slot
prefix only, few ops) against the static-shape math path of the same function and against
`decode_attention_reference` (float32 math over the whole buffers), on caches with ragged, equal
and empty (row, KV head) lengths, in every storage."""

import pytest
import torch

from dms_flex.cache import DMSKVCache
from dms_flex.kernels import reference
from dms_flex.kernels.reference import decode_attention_dense, decode_attention_reference


def filled_cache(g, B, H, D, C, lengths, store):
    dtype = torch.bfloat16 if store == "bfloat16" else torch.float32
    cache = DMSKVCache(B, H, D, C, window=2, dtype=dtype, kv_dtype=torch.int8 if store == "int8" else None)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g) * (40 if store == "int8" else 1))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g) * (40 if store == "int8" else 1))
    if cache.quantized:
        cache.k_scale.copy_(torch.rand(cache.k_scale.shape, generator=g) / 20)
        cache.v_scale.copy_(torch.rand(cache.v_scale.shape, generator=g) / 20)
    cache.length.copy_(lengths)
    return cache, dtype


@pytest.mark.parametrize("store", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("case", ["ragged", "equal", "some empty", "all empty"])
def test_cpu_branch_matches_the_math_path_and_the_reference(store, case, monkeypatch):
    g = torch.Generator().manual_seed(sum(map(ord, store + case)))
    B, H, G, D, C = 2, 3, 2, 16, 24
    lengths = {
        "ragged": torch.randint(1, C + 1, (B, H), generator=g),
        "equal": torch.full((B, H), 7),
        "some empty": torch.tensor([[0, 5, 24], [3, 0, 1]]),
        "all empty": torch.zeros(B, H, dtype=torch.long),
    }[case]
    cache, dtype = filled_cache(g, B, H, D, C, lengths, store)
    q = torch.randn(B, H * G, 1, D, generator=g).to(dtype)
    eager = decode_attention_dense(q, cache, scale=0.3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the static-shape math path
    static = decode_attention_dense(q, cache, scale=0.3)
    monkeypatch.undo()
    ref = decode_attention_reference(
        q[:, :, 0],
        cache.k[:, :, :C],
        cache.v[:, :, :C],
        cache.length,
        0.3,
        k_scale=None if cache.k_scale is None else cache.k_scale[:, :, :C],
        v_scale=None if cache.v_scale is None else cache.v_scale[:, :, :C],
    )[:, :, None]
    assert eager.shape == q.shape and eager.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(eager.float(), static.float(), atol=tol, rtol=tol)  # softmax sums: lengths differ
    torch.testing.assert_close(eager.float(), ref.float(), atol=tol, rtol=tol)
    empty = (lengths == 0).repeat_interleave(G, dim=1)
    assert (eager[empty] == 0).all()


def test_prefix_views_of_contiguous_and_strided_buffers():
    buf = torch.randn(2, 3, 9, 4)
    want = buf.reshape(6, 9, 4)[:, :5]
    got = reference._prefix(buf, 6, 5, 4)
    assert torch.equal(got, want) and got.data_ptr() == buf.data_ptr()  # a view, no copy
    strided = torch.randn(2, 9, 3, 4).transpose(1, 2)  # (2, 3, 9, 4), not contiguous
    assert torch.equal(reference._prefix(strided, 6, 5, 4), strided.reshape(6, 9, 4)[:, :5])


@pytest.mark.parametrize("case", ["ragged", "equal", "some empty"])
def test_prefix_attention_with_a_wider_dead_mask_is_the_cpu_branch_and_a_float64_softmax(case):
    """decode_attention_prefix given the lengths and a dead-slot mask built for more slots than this cache
    uses (a stacked decode step builds one mask for the longest cache of all layers): bit for bit the
    per-cache CPU branch, and a float64 softmax over each (row, KV head)'s live slots."""
    g = torch.Generator().manual_seed(len(case))
    B, H, G, D, C = 2, 3, 2, 8, 12
    lengths = {
        "ragged": torch.tensor([[3, 9, 1], [12, 4, 7]]),
        "equal": torch.full((B, H), 5),
        "some empty": torch.tensor([[0, 5, 2], [3, 0, 1]]),
    }[case]
    cache, _ = filled_cache(g, B, H, D, C, lengths, "float32")
    q = torch.randn(B, H * G, 1, D, generator=g)
    wide = torch.arange(C + 5) >= lengths.view(-1, 1, 1)  # (B*H, 1, C + 5)
    got = reference.decode_attention_prefix(q, cache, lengths.view(-1).tolist(), wide, scale=0.3)
    assert torch.equal(got, decode_attention_dense(q, cache, scale=0.3))
    want = torch.zeros(B, H * G, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(H * G):
            n = int(lengths[b, hq // G])
            if n == 0:
                continue  # no slots: output 0
            k, v = cache.k[b, hq // G, :n].double(), cache.v[b, hq // G, :n].double()
            p = torch.softmax(k @ q[b, hq, 0].double() * 0.3, dim=0)
            want[b, hq] = p @ v
    torch.testing.assert_close(got[:, :, 0].double(), want, atol=1e-5, rtol=1e-5)
