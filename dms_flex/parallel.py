"""Tensor-parallel DMS inference over a torch.distributed process group (Megatron's split, gpt-fast's way).

`shard_model(model, group)` cuts a DMS torchtune decoder in place so that each of the N ranks of
`group` holds 1/N of every layer's heads and of its MLP:

- q/k/v (and Qwen2's biases) column-parallel by heads: rank r keeps query heads [r*Hq/N, (r+1)*Hq/N)
  and KV heads [r*Hkv/N, (r+1)*Hkv/N). Query head h reads KV head h // G, so a rank's query heads are
  exactly the GQA groups of its KV heads and attention needs no communication;
- the MLP's w1 / w3 column-parallel, w2 row-parallel; the attention's output_proj row-parallel. Each
  row-parallel output is summed over the ranks by one all-reduce (a forward hook, so the module tree
  and its state-dict names stay torchtune's): two all-reduces per layer;
- DMS's decision sources go with their KV heads: the adapter's Linear(hidden -> Hkv) keeps the rows
  of the rank's KV heads; the borrowed neuron (channel D-1 of the first query head of each group) is a
  q_proj row, and a rank's q_proj rows are whole groups, so each rank reads its own groups' decisions
  (`decisions.borrowed_logits` with the local head counts). Eviction is therefore rank-local: each rank
  holds the compact DMS caches of its KV heads only (`InferenceState` reads the updated head counts),
  with per-head lengths exactly those of the unsharded model's cache for those heads;
- embeddings, norms, the output projection and the adapter's RMSNorm stay replicated (every rank sees
  the same residual stream after each all-reduce, so every rank computes the same logits).

Collectives: `dist.all_reduce` in place in eager mode (CUDA-graph capturable with NCCL), functional
collectives (`torch.distributed._functional_collectives.all_reduce`) while torch.compile traces, which
inductor schedules and `mode="reduce-overhead"` captures; the same choice gpt-fast makes. A compiled decode
step can instead sum with PyTorch's one-shot kernel over symmetric memory (`one_shot_all_reduce_options`:
lower latency for a step's small messages; `generate --tp-all-reduce one-shot`).

Order of set-up: load (full weights on every rank) -> `add_dms` -> `shard_model` -> quantize weights
(torchao) -> `fusion.fuse_projections`. Sharding slices plain weights and refuses quantized ones. A
model whose projections are already fused is sharded through its q/k/v and w1/w3 views and fused
again afterwards (the fused buffers then hold the rank's slices); fusing after sharding saves the
transient copy of the full fused buffers.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from datetime import timedelta
from typing import List, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import fusion, stats
from .torchtune_model import dms_config_of


# ============================================================================ process groups
def world_of(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """(rank, world size) within `group` (default: the whole world); (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(device_type: Optional[str] = None, timeout_s: float = 600.0) -> Tuple[Optional[object], str]:
    """The process group of a `torchrun --nproc_per_node N` launch (NCCL on CUDA, gloo on the CPU) and
    this rank's device ("cuda:LOCAL_RANK" or "cpu"). Outside torchrun (no WORLD_SIZE in the environment)
    it starts nothing and returns (None, device): a one-process run."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if "WORLD_SIZE" not in os.environ:
        return None, device
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kw = {"device_id": torch.device(device)} if device_type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return dist.group.WORLD, device


def shutdown(timeout_s: float = 60.0) -> bool:
    """End the default process group after a run; True when it was destroyed (or none was running).

    A run that replayed a compiled CUDA-graph step (`mode="reduce-overhead"`) holds NCCL kernels inside
    the graphs: on 2 H200s (torch 2.11) `dist.destroy_process_group()` then never returned, although
    every result had been written (benchmarks/RESULTS.md, section 25). So: wait for the GPU, drop
    torch.compile's CUDA graphs, then destroy the group on a helper thread and give up after `timeout_s`.
    On False the group is left to process exit; a script should then `leave(code)` rather than wait for the
    interpreter's own teardown of the communicators."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    gc.collect()  # the project's own decode graphs (dms_flex/stepping.py) live in a cycle with their state
    try:  # the graphs own the captured collectives' kernels and their memory pool
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001  (an older or newer torch without that entry point: nothing to drop)
        pass
    done = threading.Event()

    def destroy():
        try:
            dist.destroy_process_group()
            done.set()
        except Exception:  # noqa: BLE001  (reported as "not destroyed"; the caller leaves anyway)
            pass

    threading.Thread(target=destroy, name="dms_flex-destroy-process-group", daemon=True).start()
    return done.wait(timeout_s)


# ============================================================================ sharding


def leave(code: int = 0) -> NoReturn:
    """End this process now with `code`: flush stdout and stderr, then `os._exit` (no interpreter teardown).

    For a rank whose results are all written but whose exit could still hang or abort in the teardown of
    its communicators or their threads (`shutdown` returned False; a gloo rank that once aborted there,
    benchmarks/RESULTS.md, section 29d)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_divisible(model: nn.Module, world_size: int) -> None:
    """ValueError (naming the numbers) unless every layer's query heads, KV heads and MLP width divide
    by world_size: a KV head is never split or replicated, so N ranks need a multiple of N heads."""
    if world_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {world_size}")
    for i, layer in enumerate(model.layers):
        a = layer.attn
        width = layer.mlp.w1.weight.shape[0]
        for what, n in (("query heads", a.num_heads), ("KV heads", a.num_kv_heads), ("MLP hidden units", width)):
            if n % world_size:
                raise ValueError(
                    f"tensor parallelism over {world_size} ranks needs the {what} of every layer to divide by "
                    f"{world_size}; layer {i} has {n} (num_heads={a.num_heads}, num_kv_heads={a.num_kv_heads}). "
                    f"Use a tensor-parallel size that divides {a.num_kv_heads} KV heads."
                )


def shard_model(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard a DMS torchtune decoder (after `add_dms`, before quantization and fusion) over `group`
    (default: the world) in place, and return it. Every rank must hold the same full weights first.
    With one rank this is a no-op. See the module docstring for what goes where."""
    cfg = dms_config_of(model)
    rank, world = world_of(group)
    check_divisible(model, world)
    _check_plain(model)
    if world == 1:
        return model
    fused = _is_fused(model)
    if cfg.scope == "layer" and cfg.decision == "borrowed":
        raise ValueError(
            "scope='layer' with the borrowed neuron reads every KV head's decision from query head 0, which "
            "only rank 0 holds under tensor parallelism; use scope='head' or the adapter variant"
        )
    for layer in model.layers:
        a, mlp = layer.attn, layer.mlp
        hq, hkv, d = a.num_heads // world, a.num_kv_heads // world, a.head_dim
        _keep_rows(a.q_proj, rank * hq * d, hq * d)
        _keep_rows(a.k_proj, rank * hkv * d, hkv * d)
        _keep_rows(a.v_proj, rank * hkv * d, hkv * d)
        _keep_cols(a.output_proj, rank, world, group)
        a.num_heads, a.num_kv_heads = hq, hkv
        adapter = getattr(a, "dms_adapter", None)
        if adapter is not None:
            if cfg.scope == "layer":  # every KV head follows global head 0 (decisions.apply_scope): keep its row
                _set_weight(adapter.linear, adapter.linear.weight[:1].expand(hkv, -1))
            else:
                _keep_rows(adapter.linear, rank * hkv, hkv)
        width = mlp.w1.weight.shape[0] // world
        _keep_rows(mlp.w1, rank * width, width)
        if getattr(mlp, "w3", None) is not None:
            _keep_rows(mlp.w3, rank * width, width)
        _keep_cols(mlp.w2, rank, world, group)
    model.tp_group, model.tp_rank, model.tp_world_size = group, rank, world
    if fused:  # the old buffers hold the full weights, no longer viewed: drop them, fuse the slices
        fusion.unfuse_stale(model)
        fusion.fuse_projections(model)
    return model


def _is_fused(model: nn.Module) -> bool:
    """Fused buffers present (current or not: a deepcopy's parameters no longer view them)."""
    return any(
        getattr(owner, name, None) is not None
        for layer in model.layers
        for owner, name in ((layer.attn, "dms_qkv_weight"), (layer.mlp, "dms_w13_weight"))
    )


def _check_plain(model: nn.Module) -> None:
    for i, layer in enumerate(model.layers):
        for name, p in layer.named_parameters():
            if type(p.data) is not torch.Tensor:
                raise ValueError(
                    f"layer {i}'s {name} is a {type(p.data).__name__} (quantized?): shard the model first, then "
                    f"quantize its weights (each rank quantizes its own slice)"
                )


def _set_weight(lin: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, keep_bias=True) -> None:
    req = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=req)
    lin.out_features, lin.in_features = weight.shape
    if keep_bias and lin.bias is not None:
        lin.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=req)


def _keep_rows(lin: nn.Linear, start: int, n: int) -> None:
    """Column-parallel: this rank computes output features [start, start + n)."""
    w = lin.weight.detach()
    b = lin.bias.detach()[start : start + n] if lin.bias is not None else None
    _set_weight(lin, w[start : start + n], b)


def _keep_cols(lin: nn.Linear, rank: int, world: int, group) -> None:
    """Row-parallel: this rank multiplies its slice of the input features; the partial outputs are
    summed by an all-reduce after the module (a bias, if any, is added by rank 0 only)."""
    w = lin.weight.detach()
    n = w.shape[1] // world
    b = None
    if lin.bias is not None:
        b = lin.bias.detach() if rank == 0 else torch.zeros_like(lin.bias)
    _set_weight(lin, w[:, rank * n : (rank + 1) * n], b)
    lin.register_forward_hook(_all_reduce_hook(group))


def _all_reduce_hook(group):
    def hook(module, args, output):
        return all_reduce(output, group)

    return hook


def all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum of x over the ranks of `group`: functional collectives under torch.compile (traceable, in
    the graph inductor captures), the in-place c10d call in eager mode (graph-capturable with NCCL)."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group if group is not None else dist.group.WORLD)
    dist.all_reduce(x, group=group)
    return x


def one_shot_all_reduce_options(group: Optional[dist.ProcessGroup] = None, max_bytes: int = 1 << 20) -> Optional[dict]:
    """torch.compile options that lower each all-reduce of at most `max_bytes` in the compiled function to
    PyTorch's one-shot kernel over symmetric memory (`torch.ops.symm_mem.one_shot_all_reduce`): each rank's
    row-parallel GEMM writes its partial sum into a buffer its peers read over NVLink, and one kernel adds
    the partials. A decode step's all-reduces are tiny (B x hidden: 8 KiB at B=1 for Llama-3-8B), so NCCL's
    launch and protocol latency is their cost: 64 of them took ~1 ms of a 4.4 ms TP=2 step; one-shot saves
    ~6 us each (benchmarks/RESULTS.md, sections 25b and 26b).

        step = torch.compile(tm.decode_step, fullgraph=True, options=opts)   # opts from this function

    The options apply to that one compiled function (inductor's config is patched while it compiles), so
    other compiles in the process (prefill, torch.compile(mode="reduce-overhead")) keep NCCL. Capture the
    compiled step in a CUDA graph after two real calls (dms_flex/stepping.py does): under
    mode="reduce-overhead" torch 2.11 refuses the symmetric buffers inside its graph pool.

    Registers symmetric memory for the group and checks that a symmetric buffer can be allocated and
    exchanged; None (use NCCL, also exact) where this torch, the device or the group cannot: CPU / gloo,
    no symm_mem ops, no rendezvous on some rank (every rank gets the same answer). No NVLink multicast."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    if dist.get_backend(group) != "nccl" or not torch.cuda.is_available():
        return None
    name = (group or dist.group.WORLD).group_name
    device = torch.device("cuda", torch.cuda.current_device())

    def everyone(ok: bool) -> bool:  # the same answer on every rank (a rank alone on NCCL would hang)
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(int(flag))

    try:  # local checks first: nothing collective happens unless every rank can go on
        import torch._inductor.config as inductor_config
        from torch.distributed import _symmetric_memory as symm_mem

        torch.ops.symm_mem.one_shot_all_reduce  # noqa: B018  (the op exists in this build)
        capable = "_collective.auto_select" in inductor_config.get_config_copy()
    except (ImportError, AttributeError, RuntimeError):
        capable = False
    if not everyone(capable):
        return None
    try:  # register the group (inductor's check reads this registry) and exchange one buffer
        import warnings

        with warnings.catch_warnings():  # "deprecated" in torch 2.11, yet still what inductor's check reads
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(name)
        symm_mem.rendezvous(symm_mem.empty(16, dtype=torch.uint8, device=device), name)
        ok = True
    except Exception:  # noqa: BLE001  (any failure: the NCCL path stays)
        ok = False
    if not everyone(ok):
        return None
    return {"_collective.auto_select": True, "_collective.one_shot_all_reduce_threshold_bytes": int(max_bytes)}


# ============================================================================ the whole model's view of the caches
def gather_lengths(state, group: Optional[dist.ProcessGroup] = None) -> List[torch.Tensor]:
    """Each layer's live lengths over all KV heads, (B, Hkv) in global head order (rank 0's heads
    first): what the unsharded model's cache would report. A collective: every rank must call it."""
    rank, world = world_of(group)
    if world == 1:
        return [c.length.clone() for c in state.caches]
    local = torch.stack([c.length for c in state.caches])  # (L, B, Hkv/N)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = torch.cat(parts, dim=-1)
    return list(full.unbind(0))


def compression(state, group: Optional[dist.ProcessGroup] = None) -> stats.CompressionReport:
    """The whole model's compression report (all KV heads of all ranks); equals
    `InferenceState.compression()` of the unsharded model. A collective."""
    seen = state.next_pos.clamp_min(1)[:, None].float()
    return stats.compression_report([n.float() / seen for n in gather_lengths(state, group)])


def kv_bytes(state, group: Optional[dist.ProcessGroup] = None) -> dict:
    """`InferenceState.kv_bytes()` summed over the ranks (live, dense-equivalent, allocated). A collective."""
    local = state.kv_bytes()
    rank, world = world_of(group)
    if world == 1:
        return local
    keys = sorted(local)
    t = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=state.next_pos.device)
    dist.all_reduce(t, group=group)
    return {k: int(v) for k, v in zip(keys, t.tolist())}
