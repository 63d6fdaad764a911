"""int8 KV quantization (symmetric, one scale per token and KV head) through torchao's primitives,
and weight-only quantization of a model through torchao's `quantize_`.

The cache stores `q = round(x / s)` in int8 with `s = max|x| / 127.5` per (row, KV head, token);
attention reads `q * s`. `fake_quantize_kv` is the same round trip with a straight-through
gradient, so a retrofit can learn its decisions on the numbers the cache will hold.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"bf16": None, "int8": torch.int8}


def quantize_kv(x: torch.Tensor):
    """x (..., D) float -> (int8 values (..., D), float32 scales (...))."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero = choose_qparams_affine(
        x, MappingType.SYMMETRIC, block, torch.int8, eps=1e-8, scale_dtype=torch.float32, zero_point_dtype=torch.int8
    )
    return quantize_affine(x, block, scale, zero, torch.int8), scale.reshape(x.shape[:-1])


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The value attention reads: q * scale (computed in float32, returned in `dtype`)."""
    return (q.float() * scale[..., None].float()).to(dtype)


class _FakeQuantKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        q, s = quantize_kv(x.detach())
        return dequantize_kv(q, s, x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """int8 round trip of K or V (per token and head) with a straight-through gradient."""
    return _FakeQuantKV.apply(x)


WEIGHT_QUANT = ("none", "int8", "int4")


def quantize_weights(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Weight-only quantization of every nn.Linear through torchao's quantize_ (in place).

    int8: Int8WeightOnlyConfig; int4: Int4WeightOnlyConfig (group size 128, else 64 or 32; on CPU with
    Int4CPULayout, which needs bf16 weights). DMS adapters stay in full precision: they are tiny
    and their output feeds a hard threshold.
    """
    if mode not in WEIGHT_QUANT:
        raise ValueError(f"weight quantization {mode!r} is not one of {WEIGHT_QUANT}")
    if mode == "none":
        return model
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def want(m, fqn):
        return isinstance(m, torch.nn.Linear) and "dms_adapter" not in fqn

    if mode == "int8":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=want)
        return model
    device = next(model.parameters()).device
    layout = {}
    if device.type == "cpu":
        from torchao.dtypes import Int4CPULayout

        layout = {"layout": Int4CPULayout()}
    # the largest group size that divides each layer's input width (SmolLM2's 576 takes 64)
    for group in (128, 64, 32):
        quantize_(
            model,
            Int4WeightOnlyConfig(group_size=group, **layout),
            filter_fn=lambda m, fqn: want(m, fqn)
            and m.in_features % group == 0
            and type(m.weight) is torch.nn.Parameter,
        )
    return model


def quantize_weights_nf4(model: torch.nn.Module, block_size: int = 64) -> list:
    """NF4 weight storage of every nn.Linear (DMS adapters excepted), as torchtune's QLoRA recipes hold
    their frozen base: torchao's `to_nf4`, blocks of 64 values with double-quantized scales. The
    weight becomes a frozen NF4Tensor parameter; F.linear dequantizes it on the fly.

    The scale block is 256 where the layer allows it (real models), else the largest power of two
    that divides its number of blocks (tiny test models); a layer whose size is not a multiple of
    64 x 2 values stays in full precision. Returns the names of the layers left unquantized.
    """
    from torchao.dtypes.nf4tensor import to_nf4

    skipped = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or "dms_adapter" in name or not _is_plain(m.weight):
            continue
        w = m.weight.detach()
        blocks = w.numel() // block_size if w.numel() % block_size == 0 else 0
        scaler = next((s for s in (256, 128, 64, 32, 16, 8, 4, 2) if blocks and blocks % s == 0), None)
        if scaler is None:
            skipped.append(name)
            continue
        m.weight = torch.nn.Parameter(to_nf4(w, block_size, scaler), requires_grad=False)
    return skipped


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.nn.Parameter or type(t) is torch.Tensor


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A torchao tensor subclass (AffineQuantizedTensor, NF4Tensor, ...), not a plain tensor."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    return type(data) is not torch.Tensor


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor a torchao-quantized weight stands for (the tensor itself when it is plain)."""
    if not is_quantized_tensor(t):
        return t
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if hasattr(data, "get_original_weight"):  # NF4Tensor
        return data.get_original_weight()
    return data.dequantize()


def quantized_weight_names(model: torch.nn.Module) -> list:
    """State-dict names of the parameters held as torchao tensor subclasses."""
    return [n for n, p in model.named_parameters() if is_quantized_tensor(p)]
