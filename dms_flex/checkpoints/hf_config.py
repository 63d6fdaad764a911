"""config.json of a Hugging Face checkpoint folder, and the torchtune decoder it describes.

``read_hf_config(folder)`` reads it (clear errors for a missing folder or file, damaged JSON);
``model_family`` maps its ``architectures`` to "llama" or "qwen2"; ``build_decoder`` builds the
matching torchtune ``TransformerDecoder`` with torchtune's component builders:

=====================================  ==================================================
config.json                            torchtune builder
=====================================  ==================================================
Llama, untied, plain RoPE              ``llama3._component_builders.llama3``
Llama, untied, rope type "llama3"      ``llama3_1._component_builders.llama3_1``
Llama, tied embeddings                 ``llama3_2._component_builders.llama3_2`` (scale 1
                                       without rope scaling: the same as plain RoPE)
Qwen2 (tied or untied)                 ``qwen2._component_builders.qwen2``
=====================================  ==================================================
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "FAMILY_TO_ARCH",
    "CONFIG_NAME",
    "read_hf_config",
    "read_json_object",
    "model_family",
    "dims",
    "build_decoder",
    "default_dtype",
]

#: Hugging Face ``architectures`` entries this module can load, and the family each one maps to.
SUPPORTED_ARCHITECTURES: Dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
FAMILY_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

CONFIG_NAME = "config.json"
_SUPPORTED_ROPE = ("default", "llama3")


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def read_hf_config(folder) -> Dict[str, Any]:
    """Read ``folder/config.json``; clear errors for a missing folder or file."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"checkpoint folder {folder} does not exist: pass the folder that holds config.json and "
            f"model.safetensors (e.g. one written by transformers' save_pretrained)"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint path {folder} is a file, not a folder: pass the folder that holds config.json "
            f"and model.safetensors"
        )
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {folder}: a Hugging Face checkpoint folder needs config.json next to "
            f"its weights (write one with transformers' save_pretrained)"
        )
    return read_json_object(path, "repair or re-create it")


def read_json_object(path: Path, fix: str) -> Dict[str, Any]:
    """A JSON file that must hold an object; errors name the file and say how to `fix` it."""
    try:
        cfg = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}), so not JSON: {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {fix}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(cfg).__name__}")
    return cfg


def model_family(hf_config: Dict[str, Any]) -> str:
    """Map ``config.json``'s ``architectures`` (or ``model_type``) to "llama" or "qwen2"."""
    archs = hf_config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and hf_config.get("model_type") in ("llama", "qwen2"):
        return hf_config["model_type"]
    found = ", ".join(archs) if archs else f"none (model_type={hf_config.get('model_type')!r})"
    raise ValueError(
        f"unsupported architecture: config.json lists {found}; supported architectures are "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_settings(cfg: Dict[str, Any]) -> tuple[str, float, Dict[str, Any]]:
    """(rope type, theta, parameters) from either transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` pair."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json rope settings must be a dict, found {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "config.json has per-layer-type rope parameters; only one RoPE setting for all layers is supported"
        )
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope_type not in _SUPPORTED_ROPE:
        raise ValueError(
            f"unsupported rope type {rope_type!r} in config.json; supported: "
            f"{', '.join(_SUPPORTED_ROPE)} (no scaling, or Llama-3.1 style 'llama3' scaling)"
        )
    return rope_type, float(theta), params


def dims(cfg: Dict[str, Any]) -> Dict[str, int]:
    try:
        dim = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg["intermediate_size"])
    except KeyError as e:
        raise ValueError(f"config.json lacks the required field {e.args[0]!r}") from e
    num_kv = int(cfg.get("num_key_value_heads") or num_heads)
    if dim % num_heads or num_heads % num_kv:
        raise ValueError(
            f"config.json: hidden_size {dim} must be a multiple of num_attention_heads {num_heads}, "
            f"and num_attention_heads a multiple of num_key_value_heads {num_kv}"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // num_heads:
        raise ValueError(
            f"config.json: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
            f"{dim // num_heads}; torchtune's builders derive head_dim from hidden_size, so such "
            f"models are not supported"
        )
    return dict(
        dim=dim,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=dim // num_heads,
        num_layers=layers,
        vocab_size=vocab,
        intermediate_dim=inter,
    )


def _check_common(cfg: Dict[str, Any], family: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    if family == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(
                    f"config.json: {flag}=true is not supported for Llama (torchtune's Llama builders have no biases)"
                )
    if family == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ValueError(
                "config.json: use_sliding_window=true is not supported (torchtune's "
                "Qwen2 builder attends to the full context)"
            )
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"config.json: only full_attention layers are supported, found {sorted(set(layer_types))}")


# --------------------------------------------------------------------------------------------
# building the decoder
# --------------------------------------------------------------------------------------------


def build_decoder(
    hf_config: Dict[str, Any], max_seq_len: Optional[int] = None, family: Optional[str] = None
) -> nn.Module:
    """Build (randomly initialised, on the current default device and dtype) the torchtune
    ``TransformerDecoder`` that ``config.json`` describes."""
    family = family or model_family(hf_config)
    _check_common(hf_config, family)
    d = dims(hf_config)
    if max_seq_len is None:
        max_seq_len = int(hf_config.get("max_position_embeddings") or 4096)
    max_seq_len = int(max_seq_len)
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    rope_type, theta, rope_params = _rope_settings(hf_config)
    norm_eps = float(hf_config.get("rms_norm_eps", 1e-6))
    tied = bool(hf_config.get("tie_word_embeddings", False))
    common = dict(
        vocab_size=d["vocab_size"],
        num_layers=d["num_layers"],
        num_heads=d["num_heads"],
        num_kv_heads=d["num_kv_heads"],
        embed_dim=d["dim"],
        max_seq_len=max_seq_len,
        intermediate_dim=d["intermediate_dim"],
        norm_eps=norm_eps,
        rope_base=theta,
    )

    if family == "qwen2":
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported for Qwen2 (only plain RoPE)")
        from torchtune.models.qwen2._component_builders import qwen2

        return qwen2(**common, tie_word_embeddings=tied)

    if family != "llama":
        raise ValueError(f"unknown family {family!r}; supported: llama, qwen2")
    scale = float(rope_params.get("factor", 1.0)) if rope_type == "llama3" else 1.0
    if tied:
        from torchtune.models.llama3_2._component_builders import llama3_2

        model = llama3_2(**common, scale_factor=scale, tie_word_embeddings=True)
    elif rope_type == "llama3":
        from torchtune.models.llama3_1._component_builders import llama3_1

        model = llama3_1(**common, scale_factor=scale)
    else:
        from torchtune.models.llama3._component_builders import llama3

        model = llama3(**common)
    if rope_type == "llama3":
        _set_llama3_rope_details(model, rope_params, theta, d["head_dim"], max_seq_len)
    return model


def _set_llama3_rope_details(
    model: nn.Module, params: Dict[str, Any], theta: float, head_dim: int, max_seq_len: int
) -> None:
    """torchtune's builders pass only ``scale_factor`` to ``Llama3ScaledRoPE``; the other three
    llama3 rope parameters keep the Llama-3.1 defaults (1, 4, 8192). Rebuild the shared rope
    module when config.json says otherwise."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old = int(params.get("original_max_position_embeddings", 8192))
    if (low, high, old) == (1.0, 4.0, 8192):
        return
    if low == high:
        raise ValueError("config.json: llama3 rope needs low_freq_factor != high_freq_factor")
    rope = Llama3ScaledRoPE(
        dim=head_dim,
        max_seq_len=max_seq_len,
        base=theta,
        scale_factor=float(params.get("factor", 1.0)),
        low_freq_factor=low,
        high_freq_factor=high,
        old_context_len=old,
    )
    for layer in model.layers:
        layer.attn.pos_embeddings = rope


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
