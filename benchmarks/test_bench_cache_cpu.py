"""CPU micro-benchmarks (pytest-benchmark) of the compact cache's per-step bookkeeping.

Run: python3 -m pytest benchmarks/test_bench_cache_cpu.py --benchmark-only
The decode update is the per-step cost DMS adds over a dense cache write: the predecessor's mark,
the window's oldest slot, one K/V write; the append packs survivors after a prefill chunk.
"""

import pytest
import torch

from dms_flex.cache import DMSKVCache


def _cache(B, H, C, D, w):
    c = DMSKVCache(B, H, D, C, w, dtype=torch.float32)
    q = torch.randn(B, H, 64, D)
    c.append(
        q,
        torch.randn(B, H, 64, D),
        torch.randn(B, H, 64, D),
        torch.randn(B, H, 64),
        torch.zeros(B, dtype=torch.long),
        torch.full((B,), 64),
        lambda q, k, v, m: q,
    )
    return c


@pytest.mark.parametrize("B,H,C", [(1, 8, 4096), (16, 8, 4096)])
def test_decode_update(benchmark, B, H, C):
    D, w = 128, 16
    c = _cache(B, H, C, D, w)
    k, v = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    pos = torch.full((B,), 64, dtype=torch.long)
    evict = torch.rand(B, H) > 0.5

    def step():
        c.decode_update(k, v, evict, pos)
        pos.add_(1)

    benchmark(step)
    assert int(c.length.max()) <= C


@pytest.mark.parametrize("n", [64, 512])
def test_append_chunk(benchmark, n):
    B, H, C, D, w = 2, 8, 4096, 128, 16
    k = torch.randn(B, H, n, D)
    logits = torch.randn(B, H, n)

    def run():
        c = DMSKVCache(B, H, D, C, w, dtype=torch.float32)
        c.append(
            torch.randn(B, H, n, D),
            k,
            k,
            logits,
            torch.zeros(B, dtype=torch.long),
            torch.full((B,), n),
            lambda q, k, v, m: q,
        )

    benchmark(run)
