"""Custom kernels for dms_flex (Triton on CUDA, PyTorch fallbacks elsewhere)."""

from .decode import decode_attention
from .reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
