"""Tensor names between Hugging Face and torchtune module trees.

Llama checkpoints store q/k projections in Hugging Face's "rotate half" RoPE layout; torchtune's
Llama RoPE rotates interleaved pairs, and ``hf_to_tune`` permutes the q/k rows accordingly (through
torchtune's own key converters). torchtune's Qwen2 RoPE uses the rotate-half layout itself, so Qwen2
weights are not permuted.

Tensors whose name contains ``dms`` (DMS adapter parameters, e.g.
``model.layers.0.self_attn.dms_adapter.linear.weight``) are not part of the base model (`is_extra_key`);
``hf_extra_name_to_tune`` / ``tune_extra_name_to_hf`` translate such names between the two module trees.
"""

from __future__ import annotations

import re
from typing import Any, Dict

import torch

from .hf_config import dims

__all__ = [
    "is_extra_key",
    "hf_extra_name_to_tune",
    "tune_extra_name_to_hf",
    "clean_tune_key",
    "hf_to_tune",
    "tune_to_hf",
]


def is_extra_key(name: str) -> bool:
    """True for tensors that are not part of the base model (DMS parameters)."""
    return "dms" in name.lower()


# Module-path prefixes, torchtune <-> Hugging Face, for names of extra (DMS) tensors.
_TUNE_TO_HF_PREFIX = [
    (re.compile(r"^layers\.(\d+)\.attn\."), r"model.layers.\1.self_attn."),
    (re.compile(r"^layers\.(\d+)\.mlp\."), r"model.layers.\1.mlp."),
    (re.compile(r"^layers\.(\d+)\."), r"model.layers.\1."),
    (re.compile(r"^tok_embeddings\."), r"model.embed_tokens."),
    (re.compile(r"^norm\."), r"model.norm."),
]
_HF_TO_TUNE_PREFIX = [
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\."), r"layers.\1.attn."),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\."), r"layers.\1.mlp."),
    (re.compile(r"^model\.layers\.(\d+)\."), r"layers.\1."),
    (re.compile(r"^model\.embed_tokens\."), r"tok_embeddings."),
    (re.compile(r"^model\.norm\."), r"norm."),
    (re.compile(r"^model\."), r""),
]


def _translate(name: str, table) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


def hf_extra_name_to_tune(name: str) -> str:
    """``model.layers.3.self_attn.dms_adapter.w`` -> ``layers.3.attn.dms_adapter.w``."""
    return _translate(name, _HF_TO_TUNE_PREFIX)


def tune_extra_name_to_hf(name: str) -> str:
    """``layers.3.attn.dms_adapter.w`` -> ``model.layers.3.self_attn.dms_adapter.w``."""
    return _translate(name, _TUNE_TO_HF_PREFIX)


def clean_tune_key(name: str) -> str:
    # activation checkpointing and torch.compile wrappers add these to state-dict names
    return name.replace("._checkpoint_wrapped_module", "").replace("_orig_mod.", "")


def hf_to_tune(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    d = dims(cfg)
    kw = dict(num_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"], dim=d["dim"], head_dim=d["head_dim"])
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(sd, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **kw)
    from torchtune.models.convert_weights import hf_to_tune

    return hf_to_tune(sd, **kw)


def tune_to_hf(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    d = dims(cfg)
    kw = dict(num_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"], dim=d["dim"], head_dim=d["head_dim"])
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(sd, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **kw)
    from torchtune.models.convert_weights import tune_to_hf

    return tune_to_hf(sd, **kw)
