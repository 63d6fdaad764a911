"""Loading and saving DMS models as Hugging Face folders.

`config.json` carries `dms_alpha_scale`, `dms_initial_alpha_offset`, `dms_window_size`, `dms_cr` (the
released `nvidia/Qwen3-8B-DMS-8x` keys) plus this project's `dms_decision` etc. (`DMSConfig.to_hf` /
`from_hf`, parsed by `dms_config_from_hf`). Adapter weights are stored as
`model.layers.{i}.self_attn.dms_adapter.norm.weight` / `.linear.weight`, the names
`dms_flex.checkpoints.keys` maps to torchtune's `layers.{i}.attn.dms_adapter.*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..checkpoints import hf_folder as checkpoint
from ..config import DMSConfig
from .model import SUPPORTED_ARCHITECTURES, dms_config_from_hf, dms_config_of, enable_dms

__all__ = ["from_pretrained", "save_pretrained"]


def from_pretrained(folder, dms_config: Optional[DMSConfig] = None, **kwargs) -> nn.Module:
    """Load a local Hugging Face folder (Llama / Qwen2 / Qwen3) as a transformers model with DMS on.

    DMS settings come from config.json's `dms_*` keys (the released format); `dms_config` overrides
    them and is required when the folder has none. Adapter weights (`*.dms_adapter.*`) are loaded
    from the folder's safetensors. Other keyword arguments go to transformers' `from_pretrained`
    (dtype, device_map, ...). Returns the model in eval mode.
    """
    import transformers

    folder = Path(folder).expanduser()
    raw = checkpoint.read_hf_config(folder)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(archs) if archs else f"none (model_type={raw.get('model_type')!r})"
        raise ValueError(
            f"unsupported architecture in {folder / 'config.json'}: {found}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = dms_config if dms_config is not None else dms_config_from_hf(raw, source=str(folder / "config.json"))
    cls = getattr(transformers, arch)
    extra = _read_extra_tensors(folder)
    # the adapter tensors are loaded below, once the adapters exist: keep transformers' load report quiet
    # about them (the pattern is copied into the instance by post_init; the class is restored at once)
    had_own = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    cls._keys_to_ignore_on_load_unexpected = set(old or ()) | {r"\.dms_adapter\."}
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    finally:
        if had_own:
            cls._keys_to_ignore_on_load_unexpected = old
        else:
            del cls._keys_to_ignore_on_load_unexpected
    enable_dms(model, cfg)
    checkpoint.load_extra_state(model, extra, str(folder), dms_config_of(model).decision)
    return model.eval()


def save_pretrained(model: nn.Module, folder, **kwargs) -> None:
    """`model.save_pretrained(folder)` with the DMS keys written into config.json (adapter weights
    are ordinary parameters and are saved with the model)."""
    cfg = dms_config_of(model)
    for key, value in cfg.to_hf().items():
        setattr(model.config, key, value)
    model.save_pretrained(str(folder), **kwargs)
    for weights in Path(folder).glob("*.safetensors"):  # safetensors writes 0600: readable like config.json
        checkpoint.make_readable(weights)


def _weight_files(folder: Path) -> List[Path]:
    if (folder / checkpoint.WEIGHTS_INDEX_NAME).is_file():
        return checkpoint._weight_files(folder)  # a damaged index or missing shards: a ValueError that says so
    return sorted(folder.glob("*.safetensors"))


def _read_extra_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """The tensors whose name contains 'dms' (DMS parameters), without reading the base weights."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with checkpoint.safetensors_errors(path), safe_open(str(path), "pt") as f:
            for name in f.keys():
                if checkpoint.is_extra_key(name):
                    out[name] = f.get_tensor(name)
    return out
