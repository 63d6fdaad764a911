"""Whole-model decode step on CUDA graphs: dense static cache vs the DMS compact cache.

Llama-3-8B shapes (torchtune's llama3_8b), random bf16 weights. Caches are filled synthetically:
"dense" is our InferenceState with eviction off holding `ctx` tokens; DMS at CR c holds ctx/c live
slots per (row, KV head) with room for the steps to come; "gptfast" is a gpt-fast-style loop (static
K/V buffers of max length, index_put at the position, SDPA over the whole buffer with a causal
mask) on the same weights, the reference our dense path must be within 10% of. The decode step
itself is the real one (decisions from the random borrowed neuron, slot bookkeeping, attention
over live slots). Each step is captured once in a CUDA graph (eager ops; --mode compile uses
torch.compile(fullgraph=True, mode="reduce-overhead") instead) and replayed.

Usage: python benchmarks/bench_decode_step.py --batch 16 --ctx 32768 --cache gptfast 1 2 4 8 --out step.json
(a number is a CR: 1 = our dense path, eviction off; 8-int8 = CR 8 with int8 K/V.)  --max-batch finds the largest batch that fits.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from dms_flex import fusion
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig

DEVICE = "cuda"


def build_model(preset: str, max_seq_len: int, fuse: bool = True, decision: str = "borrowed"):
    from torchtune.models.llama3 import llama3_8b
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.models.llama3_2 import llama3_2_1b

    def tiny():  # CPU smoke test of this script
        return llama3(
            vocab_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=64,
            max_seq_len=4096,
            intermediate_dim=128,
        )

    def smollm2():  # SmolLM2-135M's shapes (30 layers, 9 q / 3 KV heads of 64, tied embeddings)
        return llama3(
            vocab_size=49152,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            embed_dim=576,
            max_seq_len=8192,
            intermediate_dim=1536,
            rope_base=100000,
        )

    builders = {"llama3_8b": llama3_8b, "llama3_2_1b": llama3_2_1b, "tiny": tiny, "smollm2": smollm2}
    with torch.device("meta"):
        m = builders[preset]()
    m = m.to_empty(device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    with torch.device(DEVICE):  # RoPE caches were on meta: rebuild them on the device
        for layer in m.layers:
            layer.attn.pos_embeddings.max_seq_len = max_seq_len
            layer.attn.pos_embeddings.rope_init()
    m.max_seq_len = max_seq_len
    m.requires_grad_(False)
    m = tm.add_dms(m.eval(), DMSConfig(window=512, decision=decision))
    if decision == "adapter":  # float32 adapters as trained ones are (zero-initialised: give them weights)
        with torch.no_grad():
            for layer in m.layers:
                layer.attn.dms_adapter.linear.weight.normal_(0, 0.02)
    if fuse:  # as `python -m dms_flex.generate` does (the gpt-fast-style loop reads the same fused weights)
        fusion.fuse_projections(m)
    return m


def fill(state: tm.InferenceState, live: int, ctx: int) -> None:
    """Synthetic cache: `live` slots per row/head holding the last `live` of `ctx` positions."""
    W = state.window + 1
    for c in state.caches:
        if c.quantized:  # int8 storage: random codes and a plausible per-token scale
            c.k[:, :, :live].random_(-127, 128)
            c.v[:, :, :live].random_(-127, 128)
            c.k_scale[:, :, :live].fill_(0.01)
            c.v_scale[:, :, :live].fill_(0.01)
        else:
            c.k[:, :, :live].normal_()
            c.v[:, :, :live].normal_()
        c.length.fill_(live)
        pos = torch.arange(ctx - live, ctx, device=c.k.device)
        c.slot_pos[..., :live] = pos
        c.slot_marked.zero_()
        if W <= live:
            c.win_slot[..., (pos[-W:] % W)] = torch.arange(live - W, live, device=c.k.device)
    state.next_pos.fill_(ctx)


class GptFastCache:
    """The gpt-fast pattern: K/V buffers (B, Hkv, S, D), write at input_pos, SDPA with a mask."""

    def __init__(self, model, B, max_len, ctx):
        a = model.layers[0].attn
        self.k = [
            torch.randn(B, a.num_kv_heads, max_len, a.head_dim, device=DEVICE, dtype=torch.bfloat16)
            for _ in model.layers
        ]
        self.v = [torch.randn_like(k) for k in self.k]
        self.pos = torch.full((B,), ctx, device=DEVICE, dtype=torch.long)
        self.max_len = max_len

    def bytes(self):
        return sum(k.numel() * k.element_size() * 2 for k in self.k)


def gptfast_step(model, token, cache: GptFastCache):
    pos = cache.pos
    x = model.tok_embeddings(token)
    mask = (torch.arange(cache.max_len, device=token.device)[None, :] <= pos[:, None])[:, None, None, :]
    for i, layer in enumerate(model.layers):
        a = layer.attn
        h = layer.sa_norm(x)
        q, k, v = tm._project(a, h)
        q = a.pos_embeddings(q, input_pos=pos[:, None]).transpose(1, 2)
        k = a.pos_embeddings(k, input_pos=pos[:, None]).transpose(1, 2)
        cache.k[i].index_copy_(2, pos[:1], k)  # one position shared by the batch, as in gpt-fast
        cache.v[i].index_copy_(2, pos[:1], v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=mask, enable_gqa=True)
        x = tm.finish_layer(layer, x, o)
    cache.pos.add_(1)
    return model.output(model.norm(x))[:, -1]


def add_mode_argument(p) -> None:
    """--mode, as this script and bench_tp_decode.py take it."""
    p.add_argument(
        "--mode",
        choices=["graph", "compile", "compile-graph"],
        default="graph",
        help="graph: the eager step in one CUDA graph; compile: torch.compile(mode='reduce-overhead'); "
        "compile-graph: a default-mode compiled step captured in one CUDA graph (what generate's loop replays)",
    )


def graphed(fn, *args):
    """Warm up, capture one call in a CUDA graph, return a replay function."""
    if DEVICE == "cpu":
        return lambda: fn(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    return g.replay


def time_ms(run, n):
    for _ in range(3):
        run()
    if DEVICE == "cpu":
        import time

        t = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        run()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def make_case(model, kind, B, ctx, margin, mode):
    """Returns (replay function, KV bytes allocated) or raises OutOfMemoryError."""
    tok = torch.randint(0, 200, (B, 1), device=DEVICE)
    if kind == "gptfast":
        cache = GptFastCache(model, B, ctx + margin, ctx)
        return graphed(gptfast_step, model, tok, cache), cache.bytes(), cache
    kind, config = split_kind(kind)
    _set_decode_config(DECODE_CONFIGS[config] if config else {})
    cr, kv_dtype = parse_kind(kind)
    live = int(ctx / cr)
    state = tm.InferenceState(
        model, B, capacity=live + margin, max_seq_len=ctx + margin, eviction=cr != 1, kv_dtype=kv_dtype
    )
    fill(state, live, ctx)
    if mode == "compile":
        step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
        return (lambda: step(model, tok, state)), state.kv_bytes()["allocated"], state
    if mode == "compile-graph":  # as generate runs it: the compiled step captured in one CUDA graph
        step = torch.compile(tm.decode_step, fullgraph=True, options=STEP_OPTIONS)
        return graphed(step, model, tok, state), state.kv_bytes()["allocated"], state
    return graphed(tm.decode_step, model, tok, state), state.kv_bytes()["allocated"], state


STEP_OPTIONS = None  # --step-options: torch.compile options of the compiled step (compile-graph, --profile)
DECODE_CONFIGS: dict = {}  # --decode-config NAME=...: decode-attention launch settings, used by cache kinds KIND@NAME


def split_kind(kind: str) -> tuple[str, str]:
    """'8-int8@f' -> ('8-int8', 'f'): a cache kind and the name of its --decode-config ('' for none)."""
    base, _, config = kind.partition("@")
    return base, config


def _set_decode_config(cfg: dict) -> None:
    """Install decode-attention launch settings (dms_flex/kernels/decode.py `_LAUNCH_OVERRIDE`); they are read when
    a step is traced, so a change drops dynamo's compiled steps (the same shapes would reuse the old graph)."""
    from dms_flex.kernels import decode as dk

    if cfg != dk._LAUNCH_OVERRIDE:
        dk._LAUNCH_OVERRIDE.clear()
        dk._LAUNCH_OVERRIDE.update(cfg)
        torch._dynamo.reset()


DECODE_CONFIG_KEYS = ("block_n", "num_warps", "num_stages", "num_splits", "f16")


def parse_decode_config(text: str) -> tuple[str, dict]:
    """NAME=JSON (keys: DECODE_CONFIG_KEYS) or NAME=best:PATH (the first case's best trial of a
    `bench_decode_kernel.py --sweep` JSON)."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--decode-config {text!r}: expected NAME=JSON or NAME=best:PATH")
    if spec.startswith("best:"):
        best = json.load(open(spec[5:]))["cases"][0]["best"]
        if not best:
            raise argparse.ArgumentTypeError(f"--decode-config {text!r}: the sweep has no successful trial")
        cfg = {k: best[k] for k in DECODE_CONFIG_KEYS if best.get(k) is not None}
    else:
        cfg = json.loads(spec)
    if not isinstance(cfg, dict) or not set(cfg) <= set(DECODE_CONFIG_KEYS):
        raise argparse.ArgumentTypeError(
            f"--decode-config {text!r}: a JSON object with keys among {DECODE_CONFIG_KEYS}"
        )
    # f16: true/false or a conversion's name (dms_flex.kernels.decode.F16_CVTS); the rest are counts
    from dms_flex.kernels.decode import F16_CVTS

    f16 = cfg.get("f16")
    if isinstance(f16, str) and f16 not in F16_CVTS:
        raise argparse.ArgumentTypeError(
            f"--decode-config {text!r}: f16 must be true, false or one of {sorted(F16_CVTS)}"
        )
    return name, {k: (v if k == "f16" and isinstance(v, (bool, str)) else int(v)) for k, v in cfg.items()}


def profile_step(state, model, B):
    """Kernels one decode step launches (compiled, no CUDA graphs) and their summed GPU time: the
    gap to the graph-replayed step time is launch/dependency overhead."""
    import os

    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, when imported from elsewhere
    from _bench_common import kernel_table

    tok = torch.randint(0, 200, (B, 1), device=DEVICE)
    step = torch.compile(tm.decode_step, fullgraph=True, options=STEP_OPTIONS)
    for _ in range(3):
        step(model, tok, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(model, tok, state)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    table = kernel_table(events)
    total = table["summed_ms"]
    print(f"  profile: {len(events)} kernels/step, summed kernel time {total:.3f} ms", flush=True)
    for name, n, ms in table["top"]:
        print(f"    {ms:7.3f} ms  x{n:4d}  {name[:110]}", flush=True)
    return {
        "kernels_per_step": len(events),
        "kernel_ms": total,
        "top_kernels": table["top"],
        "all_kernels": table["all"],
        "kernel_sequence": table["sequence"],
    }


def parse_kind(kind: str):
    """'8' -> (8.0, None); '8-int8' -> (8.0, torch.int8): a CR, optionally with int8 K/V storage."""
    cr, _, store = kind.partition("-")
    try:
        value = float(cr)
    except ValueError:
        value = 0.0
    if store not in ("", "int8") or value < 1:
        raise ValueError(f"--cache {kind!r}: expected gptfast, a CR >= 1 (e.g. 8) or CR-int8 (e.g. 8-int8)")
    return value, (torch.int8 if store == "int8" else None)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3_8b")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--ctx", type=int, nargs="+", default=[32768])
    p.add_argument(
        "--cache",
        nargs="+",
        default=["gptfast", "1", "8"],
        help="gptfast and/or CR values; CR-int8 (e.g. 8-int8) stores K/V as int8",
    )
    add_mode_argument(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch that fits (per cache)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (--preset tiny)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one compiled step without CUDA graphs: kernel count and summed kernel time",
    )
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="separate q/k/v and gate/up GEMMs (ablation)")
    p.add_argument(
        "--decision",
        choices=["borrowed", "adapter"],
        default="borrowed",
        help="decision source: the borrowed query channel, or the adapter (norm + float32 linear per layer, as the "
        "embedded SmolLM2's packaged adapter)",
    )
    p.add_argument(
        "--adapter-two-module",
        action="store_true",
        help="ablation: compiled steps run the adapter as norm + GEMM instead of its one-token reduction",
    )
    p.add_argument(
        "--step-options",
        type=json.loads,
        default=None,
        help="torch.compile options of the compiled step as JSON, e.g. '{\"max_autotune\": true}' (with --mode compile-graph; --profile uses them too)",
    )
    p.add_argument(
        "--decode-config",
        type=parse_decode_config,
        action="append",
        default=[],
        help="NAME=JSON or NAME=best:SWEEP.json: decode-attention launch settings for cache kinds written KIND@NAME "
        "(e.g. --cache 8 8@one --decode-config 'one={\"num_splits\": 1}')",
    )
    p.add_argument("--out")
    a = p.parse_args()
    DECODE_CONFIGS.update(dict(a.decode_config))
    if DECODE_CONFIGS:  # inductor's caches key on the traced graph, not on the launch settings the kernels take
        torch._inductor.config.force_disable_caches = True
    if a.step_options is not None and (a.mode != "compile-graph" or not isinstance(a.step_options, dict)):
        p.error("--step-options takes a JSON object of torch.compile options, with --mode compile-graph")
    global STEP_OPTIONS
    STEP_OPTIONS = a.step_options
    if a.adapter_two_module:
        from dms_flex import decisions

        decisions.DMSAdapter.compiled_one_token = False
    for kind in a.cache:
        if kind != "gptfast":
            kind, config = split_kind(kind)
            if config and config not in DECODE_CONFIGS:
                p.error(f"--cache {kind}@{config}: no --decode-config {config}=...")
            try:
                parse_kind(kind)
            except ValueError as e:
                p.error(str(e))
    global DEVICE
    DEVICE = a.device
    margin = 3 * a.steps + 64
    model = build_model(a.preset, max(a.ctx) + margin, a.fuse, a.decision)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []

    def record(ctx, B, kind, ms, kv):
        row = {
            "preset": a.preset,
            "ctx": ctx,
            "batch": B,
            "cache": kind,
            "mode": a.mode,
            "step_options": a.step_options,
            "decode_config": DECODE_CONFIGS.get(split_kind(kind)[1]),
            "decision": a.decision + (" (two-module)" if a.adapter_two_module else ""),
            "step_ms": ms,
            "tokens_per_s": B * 1000 / ms,
            "kv_allocated_GiB": kv / 2**30,
            "bytes_per_step_GB": (weights + kv) / 1e9,
            "TBps_weights_plus_kv": (weights + kv) / ms / 1e9,
        }
        rows.append(row)
        print(
            f"ctx={ctx:6d} B={B:3d} {kind:>7s}: {ms:7.2f} ms/step {row['tokens_per_s']:8.0f} tok/s  KV {kv / 2**30:6.1f} GiB"
            f"  (weights+KV)/time {row['TBps_weights_plus_kv']:.2f} TB/s",
            flush=True,
        )

    for ctx in a.ctx:
        for B in a.batch:
            for kind in a.cache:
                torch.cuda.empty_cache()
                try:
                    run, kv, keep = make_case(model, kind, B, ctx, margin, a.mode)
                    record(ctx, B, kind, time_ms(run, a.steps), kv)
                    if a.profile and kind != "gptfast":
                        rows[-1].update(profile_step(keep, model, B))
                except torch.OutOfMemoryError:
                    print(f"ctx={ctx} B={B} {kind}: out of memory", flush=True)
                    run = keep = None
                keep = run = None  # noqa: F841
        if a.max_batch:
            for kind in a.cache:
                lo, hi = 1, 4096
                while lo < hi:  # largest batch whose cache allocates and runs one step
                    mid = (lo + hi + 1) // 2
                    torch.cuda.empty_cache()
                    try:
                        run, kv, keep = make_case(model, kind, mid, ctx, margin, "graph")
                        run()
                        lo = mid
                    except torch.OutOfMemoryError:
                        hi = mid - 1
                    keep = run = None  # noqa: F841
                torch.cuda.empty_cache()
                run, kv, keep = make_case(model, kind, lo, ctx, margin, "graph")
                ms = time_ms(run, a.steps)
                record(ctx, lo, kind + "@max", ms, kv)
                keep = run = None  # noqa: F841
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    out = {"meta": {"torch": torch.__version__, "device": name, "weights_GB": weights / 1e9}, "rows": rows}
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)
    else:
        json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
