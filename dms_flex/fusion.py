"""Fused projections for inference: one GEMM for q/k/v and one for the MLP's gate/up.

A decode step at small batch is bound by how many kernels it launches, not by its bytes
(benchmarks/RESULTS.md, sections 19 and 20): five projections per layer where two GEMMs do the same
work cost three launches (and three reads of the layer's input) per layer and step.

`fuse_projections(model)` concatenates each layer's q/k/v weights (and biases) into one buffer and
rebinds `q_proj.weight`, `k_proj.weight`, `v_proj.weight` as views of it, and likewise the MLP's
`w1` / `w3`. Nothing is copied twice (the views share the buffer's storage), the module tree and
the state-dict names stay torchtune's, and loading a state dict afterwards writes through the views
into the fused buffer. `project_qkv` / `feed_forward` use the fused buffer when it is there and the
modules otherwise, so every path (eager, compiled, CPU, CUDA) runs the same math.

Call it last, once the model sits on its device in its final dtype and is no longer trained:
moving or copying the model (`.to()`, deepcopy), quantizing its weights or wrapping the projections
(LoRA) afterwards replaces the parameters. `fused_is_current` detects that; every new InferenceState
and every `forward_train` call `refresh`, which fuses such layers again (or leaves them unfused when
they can no longer be, e.g. quantized or LoRA-wrapped weights).

On the CPU in float32, `fuse_projections` also stores every plain projection weight column-major: the fused
buffers, each layer's attention output and MLP down projections, and the vocabulary projection (for a tied one,
the embedding table it shares). Same shapes and values, strides (1, out_features): a GEMV with one token reads such
a weight about 1.4x faster on the 2-core CPU machine than torch's default row-major layout, and a decode step is
mostly GEMVs (benchmarks/RESULTS.md, section 33). Elsewhere (CUDA, other dtypes) the layout stays row-major.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every layer whose projections are plain nn.Linear modules with
    plain weights of one dtype and device, and lay out the other plain projection weights as
    `inference_layout` says (column-major on the CPU in float32: module docstring). Returns how many
    layers were fused (0 = nothing to do, e.g. quantized or LoRA-wrapped weights, which keep their own
    kernels)."""
    fused = 0
    for layer in model.layers:
        fused += int(all([_fuse(*group) for group in _groups(layer)]))  # a list: every group is tried
    _layout_unfused(model)
    return fused


def _layout_unfused(model: nn.Module) -> None:
    """`inference_layout` for the projections fusion does not concatenate: each layer's attention output and
    MLP down projections, and the vocabulary projection (for torchtune's TiedLinear, the module it reads; a
    Parameter shared with the embedding stays shared)."""
    for layer in model.layers:
        for lin in (layer.attn.output_proj, getattr(layer.mlp, "w2", None)):
            inference_layout(lin)
    output = getattr(model, "output", None)
    output = getattr(output, "tied_module", output)  # torchtune's TiedLinear reads its module's weight
    embedding = getattr(model, "tok_embeddings", None)
    shared = isinstance(output, nn.Linear) and embedding is not None and output.weight is embedding.weight
    inference_layout(output)
    if shared:  # one Parameter for both, as before
        embedding.weight = output.weight


def _column_major(w: torch.Tensor) -> bool:
    """Whether inference stores this weight column-major: float32 on the CPU (see the module docstring)."""
    return w.device.type == "cpu" and w.dtype == torch.float32


def inference_layout(module: Optional[nn.Module]) -> None:
    """Lay a plain nn.Linear's (or nn.Embedding's) weight out as inference reads it fastest: column-major where
    `_column_major` says so (float32 on the CPU), torch's row-major elsewhere (so a model fused on the CPU and
    moved to CUDA or to another dtype gets its row-major weights back when it is fused again). Same values and
    shape; a weight changes only by a new Parameter (one shared with another module is then no longer shared:
    re-tie it). A weight already laid out so, or not plain, is left alone. A plain model's projections can
    take it (`benchmarks/bench_cpu_generate.py` applies it to transformers' model as an ablation); not a DMS
    adapter's Linear, which the fused decode kernel reads as a contiguous matrix (kernels/decode_update.py)."""
    if type(module) not in (nn.Linear, nn.Embedding):
        return
    w = module.weight
    if type(w.data) is not torch.Tensor or w.dim() != 2 or min(w.shape) < 2:
        return
    want_columns = _column_major(w)
    if want_columns == (w.stride(0) == 1):
        return
    data = w.detach().t().contiguous().t() if want_columns else w.detach().contiguous()
    module.weight = nn.Parameter(data, requires_grad=w.requires_grad)


def _groups(layer: nn.Module):
    """(owner, name, linears) of the projections one layer can fuse: q/k/v, and gate/up when gated."""
    attn, mlp = layer.attn, layer.mlp
    yield attn, "dms_qkv", [attn.q_proj, attn.k_proj, attn.v_proj]
    w3 = getattr(mlp, "w3", None)
    if w3 is not None:
        yield mlp, "dms_w13", [mlp.w1, w3]


def _plain(lin: nn.Module) -> bool:
    return type(lin) is nn.Linear and type(lin.weight.data) is torch.Tensor and lin.weight.dim() == 2


def _fuse(owner: nn.Module, name: str, linears) -> bool:
    if not all(_plain(lin) for lin in linears):
        return False
    w0 = linears[0].weight
    if any(lin.weight.dtype != w0.dtype or lin.weight.device != w0.device for lin in linears):
        return False
    with_bias = [lin.bias is not None for lin in linears]
    if any(with_bias) and not all(with_bias):
        return False
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = torch.cat([lin.bias.detach() for lin in linears]) if all(with_bias) else None
    if _column_major(weight):  # the rows below stay views of it, with its strides
        weight = weight.t().contiguous().t()
    sizes, row = [], 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        sizes.append(n)
        row += n
    # non-persistent buffers: moved with the module's buffers, never saved (the views are)
    owner.register_buffer(f"{name}_weight", weight, persistent=False)
    owner.register_buffer(f"{name}_bias", bias, persistent=False)
    setattr(owner, f"{name}_sizes", tuple(sizes))
    return True


def fused_is_current(owner: nn.Module, name: str, linears) -> bool:
    """Do `linears` still read the fused buffer (no later `.to()`, quantization or re-wrap)?
    A host-side check: callers make it once per model or call, not per step (`refresh`)."""
    w = getattr(owner, f"{name}_weight", None)
    if w is None:
        return False
    row = 0
    for lin in linears:
        if not _plain(lin) or lin.weight.data_ptr() != w[row:].data_ptr():
            return False
        row += lin.weight.shape[0]
    return True


def unfuse_stale(model: nn.Module) -> None:
    """Drop fused buffers whose projections no longer view them (see module docstring)."""
    for layer in model.layers:
        for owner, name, linears in _groups(layer):
            if not fused_is_current(owner, name, linears):
                _drop(owner, name)


def refresh(model: nn.Module) -> None:
    """Fuse again the layers whose fused buffers went stale (a deepcopy or `.to()` after fusing copies
    the parameters apart from the buffer; quantizing or wrapping replaces them); layers never fused stay
    as they are. A model that was fused (an inference model) also gets its other projection weights laid
    out again for where they are now (`inference_layout`: a `.to()` keeps a CPU float32 model's column-major
    strides on CUDA, and the reverse). Host-side, once per InferenceState and per forward_train call."""
    fused_before = False
    for layer in model.layers:
        for owner, name, linears in _groups(layer):
            if f"{name}_weight" in owner._buffers:
                fused_before = True
                if not fused_is_current(owner, name, linears):
                    _drop(owner, name)
                    _fuse(owner, name, linears)
    if fused_before:  # never a model that was not fused: a training model's Parameters stay the optimizer's
        _layout_unfused(model)


def _drop(owner: nn.Module, name: str) -> None:
    for suffix in ("_weight", "_bias"):
        if f"{name}{suffix}" in owner._buffers:
            del owner._buffers[f"{name}{suffix}"]
    if hasattr(owner, f"{name}_sizes"):
        delattr(owner, f"{name}_sizes")


def _fused(owner: nn.Module, name: str):
    w: Optional[torch.Tensor] = owner._buffers.get(f"{name}_weight")
    if w is None:
        return None
    return w, owner._buffers.get(f"{name}_bias"), getattr(owner, f"{name}_sizes")


def project_qkv(attn: nn.Module, h: torch.Tensor):
    """q, k, v = q_proj(h), k_proj(h), v_proj(h), as one GEMM when the layer is fused."""
    f = _fused(attn, "dms_qkv")
    if f is None:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    w, b, sizes = f
    return F.linear(h, w, b).split(sizes, dim=-1)


def feed_forward(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """torchtune's FeedForward (w2(activation(w1 h) * w3 h)), gate and up as one GEMM when fused."""
    f = _fused(mlp, "dms_w13")
    if f is None:
        return mlp(h)
    w, b, sizes = f
    gate, up = F.linear(h, w, b).split(sizes, dim=-1)
    return mlp.w2(mlp.activation(gate) * up)
