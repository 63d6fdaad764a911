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
    scale, zero = choose_qparams_affine(x, MappingType.SYMMETRIC, block, torch.int8, eps=1e-8,
                                        scale_dtype=torch.float32, zero_point_dtype=torch.int8)
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
        quantize_(model, Int4WeightOnlyConfig(group_size=group, **layout),
                  filter_fn=lambda m, fqn: want(m, fqn) and m.in_features % group == 0
                  and type(m.weight) is torch.nn.Parameter)
    return model
