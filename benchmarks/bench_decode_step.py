"""Whole-model decode step on CUDA graphs: dense static cache vs the DMS compact cache.

Llama-3-8B shapes (torchtune's llama3_8b), random bf16 weights. The caches are filled
synthetically: dense holds `ctx` tokens; DMS at CR c holds ctx/c live slots per (row, KV head)
with capacity for the steps to come; the decode step itself is the real one (decisions from the
random borrowed neuron, slot bookkeeping, attention over live slots), compiled with
torch.compile(fullgraph=True, mode="reduce-overhead").

Usage: python benchmarks/bench_decode_step.py --batch 16 --ctx 8192 32768 --cr 1 8 --out step.json
(CR 1 = the dense cache: eviction off, capacity = ctx + steps.)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig


def build_model(preset: str, max_seq_len: int):
    from torchtune.models.llama3 import llama3_8b
    from torchtune.models.llama3_2 import llama3_2_1b

    builders = {"llama3_8b": llama3_8b, "llama3_2_1b": llama3_2_1b}
    with torch.device("meta"):
        m = builders[preset]()
    m = m.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    # RoPE caches were on meta: rebuild them
    with torch.device("cuda"):
        for layer in m.layers:
            layer.attn.pos_embeddings.max_seq_len = max_seq_len
            layer.attn.pos_embeddings.rope_init()
    m.max_seq_len = max_seq_len
    m.requires_grad_(False)
    return tm.add_dms(m.eval(), DMSConfig(window=512))


def fill(state: tm.InferenceState, live: int, ctx: int) -> None:
    """Synthetic cache: `live` slots per row/head holding the last `live` of `ctx` positions."""
    W = state.window + 1
    for c in state.caches:
        c.k[:, :, :live].normal_()
        c.v[:, :, :live].normal_()
        c.length.fill_(live)
        pos = torch.arange(ctx - live, ctx, device=c.k.device)
        c.slot_pos[..., :live] = pos
        c.slot_marked.zero_()
        if W <= live:
            tail = torch.arange(live - W, live, device=c.k.device)
            c.win_slot[..., (pos[-W:] % W)] = tail
    state.next_pos.fill_(ctx)


def time_steps(step, model, state, tok, n=20):
    for _ in range(3):
        step(model, tok, state)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        step(model, tok, state)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3_8b")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--ctx", type=int, nargs="+", default=[32768])
    p.add_argument("--cr", type=float, nargs="+", default=[1, 8])
    p.add_argument("--attn", default="triton", help="triton (dms_flex.kernels, the CUDA default) or sdpa (masked SDPA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out")
    a = p.parse_args()
    margin = 3 * a.steps + 64
    model = build_model(a.preset, max(a.ctx) + margin)
    from dms_flex.cache import decode_attention_dense, decode_attention_kernel

    attend = {"triton": decode_attention_kernel, "sdpa": decode_attention_dense}[a.attn]
    step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
    rows = []
    for ctx in a.ctx:
        for B in a.batch:
            for cr in a.cr:
                live = int(ctx / cr)
                dense = cr == 1
                torch.compiler.reset()
                torch.cuda.empty_cache()
                try:
                    state = tm.InferenceState(model, B, capacity=live + margin, max_seq_len=ctx + margin,
                                              eviction=not dense)
                except torch.OutOfMemoryError:
                    print(f"ctx={ctx} B={B} CR={cr}: out of memory", flush=True)
                    continue
                fill(state, live, ctx)
                tok = torch.randint(0, 1000, (B, 1), device="cuda")
                fn = lambda m, t, s: step(m, t, s, attend)
                ms = time_steps(fn, model, state, tok, a.steps)
                kv = state.kv_bytes()["allocated"]
                row = {"preset": a.preset, "ctx": ctx, "batch": B, "cr": cr, "attn": a.attn, "step_ms": ms,
                       "tokens_per_s": B * 1000 / ms, "kv_allocated_GiB": kv / 2**30,
                       "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
                rows.append(row)
                print(f"ctx={ctx:6d} B={B:3d} CR={cr:<4g} {a.attn}: {ms:7.2f} ms/step  {row['tokens_per_s']:8.0f} tok/s  "
                      f"KV {row['kv_allocated_GiB']:.1f} GiB", flush=True)
                del state
    out = {"meta": {"torch": torch.__version__, "device": torch.cuda.get_device_name()}, "rows": rows}
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)
    else:
        json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
