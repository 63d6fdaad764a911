"""Tensor-parallel decode step (dms_flex/parallel.py): TP=1 against TP=N, dense and DMS, on CUDA graphs.

Llama-3-8B shapes, random bf16 weights (bench_decode_step.build_model), caches filled synthetically.
One launch measures both sides: `torchrun --nproc_per_node 2` runs every case first on rank 0 alone
with the unsharded model (TP=1; the other ranks wait), then shards the same weights over all ranks
and runs every case again (TP=2). Each step is the real `decode_step` captured once in a CUDA graph
(NCCL all-reduces included) and replayed (--mode compile: torch.compile(mode="reduce-overhead"),
minutes of compile per shape).

DMS caches do not hold the same number of tokens per KV head, and under tensor parallelism each rank
holds other heads, so a step waits for the rank with the most live KV. Per-head lengths follow
--lengths: `smollm2` (default) resamples the kept fraction per (layer, KV head) measured with the
packaged SmolLM2-135M adapter (below), rescaled to the CR asked for; `uniform` gives every head ctx/CR.
Each rank also times its attention alone (the decode kernel over its caches, all layers, one CUDA
graph); the report gives the slowest rank's attention time against the mean, and that excess as a
fraction of the step.

Usage (2 GPUs): torchrun --nproc_per_node 2 benchmarks/bench_tp_decode.py --out tp.json
One process: python3 benchmarks/bench_tp_decode.py (TP=1 only). CPU smoke test of the script:
torchrun --standalone --nproc_per_node 2 benchmarks/bench_tp_decode.py --device cpu --preset tiny --ctx 512
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_decode_step as bds  # noqa: E402
from _bench_common import git, log, write_json  # noqa: E402

from dms_flex import parallel  # noqa: E402
from dms_flex import torchtune_model as tm  # noqa: E402

# Kept fraction per (layer, KV head) of the packaged SmolLM2-135M-Instruct adapter (30 layers x 3 KV
# heads, sorted), averaged over 4 rows of 2,048 tokens of Python standard-library source (argparse,
# typing, inspect, dataclasses), window 64, float32 on the CPU: CR 6.1. A few heads keep nearly
# everything and most keep little (coefficient of variation 1.37 over heads; rows vary ~9% around their
# head's mean). The floor 0.032 is the window: 65 / 2,048.
SMOLLM2_KEPT = (
    0.032, 0.033, 0.033, 0.033, 0.034, 0.035, 0.035, 0.036, 0.037, 0.037, 0.037, 0.038, 0.038, 0.038, 0.040,
    0.040, 0.041, 0.042, 0.043, 0.046, 0.048, 0.048, 0.048, 0.050, 0.050, 0.051, 0.052, 0.053, 0.053, 0.054,
    0.054, 0.057, 0.058, 0.060, 0.060, 0.061, 0.062, 0.063, 0.064, 0.065, 0.066, 0.067, 0.070, 0.070, 0.073,
    0.074, 0.074, 0.075, 0.079, 0.080, 0.082, 0.082, 0.086, 0.087, 0.087, 0.098, 0.101, 0.103, 0.113, 0.114,
    0.121, 0.125, 0.129, 0.130, 0.138, 0.139, 0.142, 0.144, 0.149, 0.155, 0.183, 0.185, 0.186, 0.192, 0.214,
    0.233, 0.234, 0.274, 0.297, 0.395, 0.466, 0.524, 0.534, 0.604, 0.699, 0.743, 0.829, 0.956, 1.000, 1.000,
)  # fmt: skip
ROW_JITTER = 0.094  # log-std of a row's kept fraction around its head's (same measurement)


def head_lengths(profile: str, layers: int, B: int, heads: int, ctx: int, cr: float, window: int, seed: int = 0):
    """Live slots (layers, B, heads) with mean ctx / cr, each in [window + 1, ctx]; the same on every rank
    (seeded), so TP=1 and TP=N see the same caches and each rank takes its own heads' slice."""
    floor = min(ctx, window + 1) / ctx
    if profile == "uniform" or cr == 1:
        kept = torch.full((layers, B, heads), 1.0 / cr)
    else:
        g = torch.Generator().manual_seed(seed)
        base = torch.tensor(SMOLLM2_KEPT)[torch.randint(len(SMOLLM2_KEPT), (layers, 1, heads), generator=g)]
        kept = base * torch.exp(ROW_JITTER * torch.randn(layers, B, heads, generator=g))
        scale = 1.0
        for _ in range(50):  # rescale to the asked mean with the clip in place
            scale *= (1.0 / cr) / float((kept * scale).clamp(floor, 1).mean())
        kept = (kept * scale).clamp(floor, 1)
    return (kept.clamp(floor, 1) * ctx).round().long()


def fill_heads(state, live: torch.Tensor, ctx: int) -> None:
    """bench_decode_step.fill for per-head lengths: head (b, h) of layer i holds the last live[i, b, h]
    of ctx positions in slots [0, live), marks clear, the ring pointing at the newest window + 1."""
    bds.fill(state, int(live.max()), ctx)  # K/V contents and next_pos
    W = state.window + 1
    for c, n in zip(state.caches, live.to(state.next_pos.device)):
        C = c.slot_pos.shape[-1]
        s = torch.arange(C, device=n.device)
        c.length.copy_(n)
        c.slot_pos.copy_(torch.where(s < n[..., None], ctx - n[..., None] + s, torch.full_like(s, -1)))
        if W <= int(n.min()):
            j = torch.arange(W, device=n.device)
            c.win_slot[..., (ctx - W + j) % W] = n[..., None] - W + j


def attention_replay(state, model, B: int):
    """This rank's decode attention alone: every layer's kernel over its caches, one graph (it reads
    the lengths from the caches' buffers, so a refill with other lengths replays the same graph)."""
    a = model.layers[0].attn
    q = torch.randn(B, a.num_heads, 1, a.head_dim, device=state.next_pos.device, dtype=torch.bfloat16)
    read = tm.default_decode_attention(q.device)

    def run():
        for c in state.caches:
            read(q, c)

    return bds.graphed(run)


def run_case(model, B, ctx, kind, args, rank, group, options=None):
    """One (batch, context, cache) case on the ranks of `group` (None: this process alone): the step
    time, then this rank's attention time for each of --draws draws of per-head lengths (draw 0 is the
    one the step ran with)."""
    world = parallel.world_of(group)[1] if group is not None else 1
    cr, kv_dtype = bds.parse_kind(kind)
    margin = 3 * args.steps + 64
    a = model.layers[0].attn
    heads = slice(rank * a.num_kv_heads, (rank + 1) * a.num_kv_heads)
    window = model.dms_config.effective_window

    def lengths(draw):
        return head_lengths(args.lengths, len(model.layers), B, a.num_kv_heads * world, ctx, cr, window, draw)[
            ..., heads
        ]

    # capacity ctx + margin: every draw fits (a static cache sized for its longest head costs about that)
    state = tm.InferenceState(
        model, B, capacity=ctx + margin, max_seq_len=ctx + margin, eviction=cr != 1, kv_dtype=kv_dtype
    )
    live = None if cr == 1 else lengths(args.seed)
    if live is None:
        bds.fill(state, ctx, ctx)
    else:
        fill_heads(state, live, ctx)
    tok = torch.randint(0, 200, (B, 1), device=state.next_pos.device)
    if args.mode == "compile":
        step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")

        def run():
            step(model, tok, state)
    elif args.mode == "compile-graph":  # the generate loop's way (dms_flex/stepping.py): a default-mode compiled
        # static shapes: each case compiles for its own; a dynamic batch would leave the one-shot lowering a
        # symbolic message size, which inductor cannot compare with its threshold
        step = torch.compile(tm.decode_step, fullgraph=True, dynamic=False, options=options)
        run = bds.graphed(step, model, tok, state)  # the compiled step in one CUDA graph
    else:
        run = bds.graphed(tm.decode_step, model, tok, state)
    if group is not None:
        dist.barrier(group)
    step_ms = bds.time_ms(run, args.steps)
    attn = attention_replay(state, model, B)
    attn_ms, slots = [], []
    for draw in range(1 if live is None else args.draws):
        if draw:
            live = lengths(args.seed + draw)
            fill_heads(state, live, ctx)
        attn_ms.append(bds.time_ms(attn, args.steps))
        slots.append(B * ctx * a.num_kv_heads * len(model.layers) if live is None else int(live.sum()))
    kv = state.kv_bytes()["allocated"] / 2**30
    return dict(step_ms=step_ms, attn_ms=attn_ms, live_slots=slots, kv_allocated_GiB=kv)


def measure(model, args, tp: int, rank: int, group, rows: list, all_reduce: str = "nccl", options=None) -> None:
    """Every case at tensor-parallel size tp (group None: rank 0 alone); rows get one entry per case.
    options: torch.compile options of the step (parallel.one_shot_all_reduce_options for the one-shot kind)."""
    for ctx in args.ctx:
        for B in args.batch:
            for kind in args.cache:
                err = None
                try:
                    res = run_case(model, B, ctx, kind, args, rank, group, options)
                except torch.OutOfMemoryError:
                    err, res = "out of memory", {}
                _free()
                per_rank = _gather(res, err, group)
                if rank == 0:
                    rows.append(_row(args, tp, ctx, B, kind, per_rank, all_reduce))
                    _print(rows[-1])


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gather(res: dict, err, group):
    mine = {"error": err, **res}
    if group is None:
        return [mine]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def _row(args, tp, ctx, B, kind, per_rank, all_reduce="nccl"):
    row = dict(preset=args.preset, lengths=args.lengths, mode=args.mode, tp=tp, ctx=ctx, batch=B, cache=kind)
    if tp > 1:
        row["all_reduce"] = all_reduce
    errors = [r["error"] for r in per_rank if r["error"]]
    if errors:
        return dict(row, error=errors[0])
    step = max(r["step_ms"] for r in per_rank)  # every rank waits in the same all-reduces
    attn = list(zip(*[r["attn_ms"] for r in per_rank]))  # per draw: each rank's attention ms
    excess = sorted(excess_of(t, step) for t in attn)
    slots = list(zip(*[r["live_slots"] for r in per_rank]))
    return dict(
        row,
        step_ms=step,
        tokens_per_s=B * 1000 / step,
        attn_ms_per_rank=list(attn[0]),
        attn_slowest_over_mean=max(attn[0]) / (sum(attn[0]) / len(attn[0])),
        imbalance_of_step=excess_of(attn[0], step),
        draws=len(attn),
        imbalance_of_step_median=excess[len(excess) // 2],
        imbalance_of_step_max=excess[-1],
        slots_slowest_over_mean=[max(n) / (sum(n) / len(n)) for n in slots],
        attn_ms_per_draw_per_rank=[list(t) for t in attn],
        kv_allocated_GiB_per_rank=[r["kv_allocated_GiB"] for r in per_rank],
    )


def excess_of(attn_per_rank, step_ms: float) -> float:
    """The slowest rank's attention time beyond the mean, as a fraction of the step."""
    return (max(attn_per_rank) - sum(attn_per_rank) / len(attn_per_rank)) / step_ms


def _print(r):
    ar = f" ({r['all_reduce']})" if r.get("all_reduce", "nccl") != "nccl" else ""
    head = f"TP={r['tp']}{ar} ctx={r['ctx']:6d} B={r['batch']:3d} cache {r['cache']:>6s}:"
    if "error" in r:
        log(f"{head} {r['error']}")
        return
    log(
        f"{head} {r['step_ms']:7.2f} ms/step {r['tokens_per_s']:8.0f} tok/s; attention per rank "
        f"{' '.join(f'{a:.3f}' for a in r['attn_ms_per_rank'])} ms (slowest/mean {r['attn_slowest_over_mean']:.3f}, "
        f"excess {100 * r['imbalance_of_step']:.1f}% of the step; over {r['draws']} length draws median "
        f"{100 * r['imbalance_of_step_median']:.1f}%, max {100 * r['imbalance_of_step_max']:.1f}%); KV allocated/rank "
        f"{max(r['kv_allocated_GiB_per_rank']):.1f} GiB"
    )


def summary(rows, tp: int) -> dict:
    """The issue's three targets from the rows: TP=N / TP=1 step per case, the dense case at N times
    the batch against TP=1 at the batch, and the worst DMS imbalance."""

    def key(r):  # TP=1 rows have no all-reduce; a TP=N row names its kind when it is not NCCL's
        return (r["tp"], r["ctx"], r["batch"], r["cache"], r.get("all_reduce", "nccl"))

    ok = {key(r): r for r in rows if "error" not in r}
    ratio = {}
    for (t, ctx, B, kind, ar), r in ok.items():
        base = ok.get((1, ctx, B, kind, "nccl"))
        if t == tp and base is not None and tp > 1:
            ratio[f"ctx{ctx}_B{B}_cr{kind}" + ("" if ar == "nccl" else f"_{ar}")] = r["step_ms"] / base["step_ms"]
    scaled = {}
    for (t, ctx, B, kind, ar), r in ok.items():
        base = ok.get((1, ctx, B // tp, kind, "nccl")) if B % tp == 0 else None
        if t == tp and tp > 1 and base is not None:
            name = f"ctx{ctx}_B{B // tp}->{B}_cr{kind}" + ("" if ar == "nccl" else f"_{ar}")
            scaled[name] = r["step_ms"] / base["step_ms"]
    dms = [r["imbalance_of_step_median"] for (t, *_, kind, ar), r in ok.items() if t == tp and kind != "1"]
    return {
        "step_tpN_over_tp1": ratio,
        "step_tpN_at_N_x_batch_over_tp1": scaled,
        "worst_dms_imbalance_of_step_median_over_draws": max(dms) if dms else None,
    }


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3_8b", help="llama3_8b, llama3_2_1b, smollm2 or tiny (CPU smoke)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--ctx", type=int, nargs="+", default=[32768])
    p.add_argument("--cache", nargs="+", default=["1", "8"], help="CRs (1 = dense, eviction off); CR-int8 for int8 K/V")
    p.add_argument("--lengths", choices=["smollm2", "uniform"], default="smollm2", help="per-head live lengths")
    bds.add_mode_argument(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="the first draw of per-head lengths (weights: always 0)")
    p.add_argument("--draws", type=int, default=16, help="draws of per-head lengths whose attention is timed")
    p.add_argument("--skip-tp1", action="store_true", help="under torchrun: measure TP=N only")
    p.add_argument(
        "--all-reduce",
        nargs="+",
        choices=["nccl", "one-shot"],
        default=["nccl"],
        help="TP=N's all-reduces, each measured in turn: NCCL's, or (--mode compile-graph) PyTorch's one-shot kernel "
        "over symmetric memory (dms_flex/parallel.py one_shot_all_reduce_options)",
    )
    p.add_argument("--device", default="cuda", help="cuda; cpu smoke-tests the script (gloo, --preset tiny)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    for kind in args.cache:
        try:
            bds.parse_kind(kind)
        except ValueError as e:
            p.error(str(e))
    if len(set(args.all_reduce)) != len(args.all_reduce):
        p.error(f"--all-reduce {' '.join(args.all_reduce)}: name each kind once")
    if "one-shot" in args.all_reduce and args.mode != "compile-graph":
        # inductor lowers the all-reduce (an eager step keeps NCCL's); under mode="reduce-overhead" its symmetric
        # buffers are allocated inside torch.compile's graph pool, which torch 2.11 refuses (RESULTS.md, 26)
        p.error("--all-reduce one-shot needs --mode compile-graph")
    group, device = parallel.init_from_env(args.device)
    rank, world = parallel.world_of(group)
    bds.DEVICE = "cuda" if args.device == "cuda" else "cpu"  # the current device (set_device(LOCAL_RANK))
    torch.manual_seed(0)  # the same full weights on every rank
    model = bds.build_model(args.preset, max(args.ctx) + 3 * args.steps + 64)
    parallel.check_divisible(model, world)
    rows, skipped = [], []
    if world == 1 or not args.skip_tp1:
        if rank == 0:
            measure(model, args, 1, 0, None, rows)
        if group is not None:
            dist.barrier()
    if world > 1:
        parallel.shard_model(model, group)
        _free()
        for ar in args.all_reduce:
            options = None
            if ar == "one-shot":
                options = parallel.one_shot_all_reduce_options(group)
                if options is None:
                    log("one-shot all-reduce unavailable here (no NCCL group or no symmetric memory): skipped")
                    skipped.append(ar)
                    continue
            measure(model, args, world, rank, group, rows, ar, options)
    if rank == 0:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        meta = {"torch": torch.__version__, "device": name, "world": world, "commit": git("rev-parse", "HEAD")}
        if skipped:
            meta["all_reduce_skipped"] = skipped  # asked for, not available on this machine
        out = {"meta": meta, "summary": summary(rows, world), "rows": rows}
        log("summary:", out["summary"])
        if args.out:
            write_json(args.out, out)
    if group is not None and not parallel.shutdown():  # dms_flex/parallel.py `shutdown`: results are written
        parallel.leave(0)


if __name__ == "__main__":
    main()
