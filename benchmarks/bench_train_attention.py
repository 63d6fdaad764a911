"""Training attention forward+backward on CUDA: DMS flex vs plain causal attention.

One "step" = the DMS terms (shift, logistic noise, relaxation) + attention forward + backward into
q, k, v and the decision logits. Variants, side by side in one process:
  sdpa_causal      F.scaled_dot_product_attention(is_causal=True) (FlashAttention), GQA expanded
  flex_causal      compiled flex_attention with a causal block mask
  flex_dms         dms_flex.attention (score_mod reads log(1-alpha) per KV head; grad via the capture)
  flex_dms_perhead the same bias pre-expanded to one row per query head (less atomic contention)
  flex_dms_nograd  the DMS score_mod with a bias that needs no gradient (the cost of the score_mod alone)

Usage: python benchmarks/bench_train_attention.py --out results.json [--seq 8192 --batch 1 ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from dms_flex import attention, decisions, masks
from dms_flex.config import DMSConfig


def bench(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def run_case(B, T, Hq, Hkv, D, window, variants):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    G = Hq // Hkv
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(B, Hkv, T, device=dev, requires_grad=True)
    go = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    cfg = DMSConfig(window=window)
    bm = attention.make_block_mask(None, B, T, dev)

    def dms_terms():
        decided = decisions.shift_to_decided_token(logits)
        lk, a_st = decisions.relax(decided, cfg, training=True)
        return lk

    def sdpa():
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
        out.backward(go)

    def flex_causal():
        out = flex(q, k, v, block_mask=bm, enable_gqa=True)
        out.backward(go)

    def flex_dms():
        out = attention.flex_dms_attention(q, k, v, dms_terms(), window, block_mask=bm)
        out.backward(go)

    def flex_dms_perhead():
        lk = dms_terms().repeat_interleave(G, 1)
        out = flex(q, k, v, score_mod=masks.generate_dms_score_mod(lk, window, 1), block_mask=bm, enable_gqa=True)
        out.backward(go)

    def flex_dms_nograd():
        lk = dms_terms().detach()
        out = flex(q, k, v, score_mod=masks.generate_dms_score_mod(lk, window, G), block_mask=bm, enable_gqa=True)
        out.backward(go)

    fns = dict(
        sdpa_causal=sdpa,
        flex_causal=flex_causal,
        flex_dms=flex_dms,
        flex_dms_perhead=flex_dms_perhead,
        flex_dms_nograd=flex_dms_nograd,
    )
    res = {}
    for name in variants:
        fn = fns[name]
        fn()  # compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = bench(fn)
        peak = torch.cuda.max_memory_allocated() - base
        res[name] = {"ms": ms, "peak_extra_MiB": peak / 2**20}
        q.grad = k.grad = v.grad = logits.grad = None
    sxs = B * Hq * T * T * 2 / 2**20
    return {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "window": window, "SxS_bf16_MiB": sxs, "results": res}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[8192])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--heads", default="32,8,64", help="Hq,Hkv,D (Llama-3.2-1B: 32,8,64; Llama-3-8B: 32,8,128)")
    p.add_argument("--window", type=int, nargs="+", default=[256])
    p.add_argument("--variants", default="sdpa_causal,flex_causal,flex_dms,flex_dms_perhead,flex_dms_nograd")
    p.add_argument("--out")
    a = p.parse_args()
    Hq, Hkv, D = map(int, a.heads.split(","))
    rows = []
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    for T in a.seq:
        for B in a.batch:
            for w in a.window:
                r = run_case(B, T, Hq, Hkv, D, w, a.variants.split(","))
                rows.append(r)
                base = r["results"].get("sdpa_causal", {}).get("ms")
                fc = r["results"].get("flex_causal", {}).get("ms")
                for name, x in r["results"].items():
                    ratio = f"{x['ms'] / base:.2f}x sdpa" if base else ""
                    ratio2 = f"{x['ms'] / fc:.2f}x flex_causal" if fc else ""
                    print(
                        f"B={B} T={T} w={w} {name:18s} {x['ms']:8.2f} ms  {ratio:12s} {ratio2:18s} "
                        f"peak +{x['peak_extra_MiB']:.0f} MiB (SxS bf16 would be {r['SxS_bf16_MiB']:.0f} MiB)",
                        flush=True,
                    )
    out = {"meta": meta, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    else:
        json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
