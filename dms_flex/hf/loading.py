"""Loading and saving DMS models as Hugging Face folders.

`config.json` carries `dms_alpha_scale`, `dms_initial_alpha_offset`, `dms_window_size`, `dms_cr` (the
released `nvidia/Qwen3-8B-DMS-8x` keys) plus this project's `dms_decision` etc. (`DMSConfig.to_hf` /
`from_hf`, parsed by `dms_config_from_hf`). Adapter weights are stored as
`model.layers.{i}.self_attn.dms_adapter.norm.weight` / `.linear.weight`, the names
`dms_flex.checkpoints.keys` maps to torchtune's `layers.{i}.attn.dms_adapter.*`. LoRA factors of a
retrofit with `lora.enabled=true` (`*.lora_A.weight` / `*.lora_B.weight`, `dms_lora_*` keys) are merged
into the base weights on load, as `dms_flex.checkpoints.lora` describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..checkpoints import hf_folder as checkpoint
from ..checkpoints.adapter import read_adapter, read_adapter_lora
from ..checkpoints.lora import LoRADelta, LoRASettings, check_lora, is_lora_key, merge_lora
from ..config import DMSConfig
from .model import SUPPORTED_ARCHITECTURES, dms_config_from_hf, dms_config_of, enable_dms

__all__ = ["from_pretrained", "inference_layout", "save_pretrained"]


def from_pretrained(folder, dms_config: Optional[DMSConfig] = None, *, adapter=None, **kwargs) -> nn.Module:
    """Load a local Hugging Face folder (Llama / Qwen2 / Qwen3) as a transformers model with DMS on.

    DMS settings come from config.json's `dms_*` keys (the released format); `dms_config` overrides
    them and is required when the folder has none. Adapter weights (`*.dms_adapter.*`) are loaded
    from the folder's safetensors, LoRA factors merged into the base weights. `adapter`: an adapter
    folder (`python -m dms_flex.checkpoints export-adapter`) whose settings, adapter weights and LoRA
    replace the folder's own. Other keyword arguments go to transformers' `from_pretrained`
    (dtype, device_map, ...). Returns the model in eval mode, its weights laid out by `inference_layout`
    (column-major for float32 on the CPU).
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
    if adapter is not None:
        adapter = Path(adapter).expanduser()
        adapter_cfg, extra = read_adapter(adapter)
        lora = read_adapter_lora(adapter, adapter_cfg)
        source = str(adapter / "dms_config.json")
        raw_dms = {**{k: v for k, v in raw.items() if not k.startswith("dms_")}, **adapter_cfg}
    else:
        extra, lora_tensors = _read_extra_tensors(folder)
        settings = LoRASettings.from_hf(raw, source=str(folder / "config.json"))
        if (settings is None) != (not lora_tensors):
            raise ValueError(f"{folder}: LoRA factors and the dms_lora_* keys of config.json must come together")
        lora = None if settings is None else LoRADelta(settings, lora_tensors)
        source, raw_dms = str(folder / "config.json"), raw
    cfg = dms_config if dms_config is not None else dms_config_from_hf(raw_dms, source=source)
    cls = getattr(transformers, arch)
    # the adapter tensors are loaded below, once the adapters exist: keep transformers' load report quiet
    # about them (the pattern is copied into the instance by post_init; the class is restored at once)
    had_own = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    cls._keys_to_ignore_on_load_unexpected = set(old or ()) | {r"\.dms_adapter\.", r"\.lora_[AB]\."}
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    finally:
        if had_own:
            cls._keys_to_ignore_on_load_unexpected = old
        else:
            del cls._keys_to_ignore_on_load_unexpected
    if lora is not None:
        _merge_lora_into(model, lora, str(adapter or folder))
    enable_dms(model, cfg)
    checkpoint.load_extra_state(model, extra, str(adapter or folder), dms_config_of(model).decision)
    return inference_layout(model).eval()


def inference_layout(model: nn.Module) -> nn.Module:
    """Lay the model's Linear and Embedding weights out as `dms_flex.fusion.inference_layout` says for where they
    are: column-major for float32 on the CPU (a one-token GEMV reads them faster there: benchmarks/RESULTS.md,
    section 33), row-major elsewhere. A tied output projection stays tied; the DMS adapters keep their layout.
    `from_pretrained` calls it; call it again after moving a model between the CPU and a GPU or changing its
    dtype. Values and the state dict are unchanged. Returns the model."""
    from ..fusion import inference_layout as lay_out

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    for name, module in model.named_modules():
        if "dms_adapter" in name.split(".") or (tied and module is out):
            continue
        lay_out(module)
    if tied:  # the table was laid out above: the head reads the same Parameter again
        out.weight = inp.weight
    return model


@torch.no_grad()
def _merge_lora_into(model: nn.Module, lora: LoRADelta, source: str) -> None:
    """W + (alpha / rank) * B @ A into the model's weights, as the torchtune loader merges them."""
    params = dict(model.named_parameters())
    check_lora(lora, {k: v.shape for k, v in params.items()}, source)
    modules = {k[: -len(".lora_A.weight")] for k in lora.tensors if k.endswith(".lora_A.weight")}
    merged = merge_lora({f"{m}.weight": params[f"{m}.weight"] for m in modules}, lora)
    for name, value in merged.items():
        params[name].copy_(value.to(params[name].dtype))


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


def _read_extra_tensors(folder: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(DMS parameters: names containing 'dms'; LoRA factors), without reading the base weights."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    lora: Dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with checkpoint.safetensors_errors(path), safe_open(str(path), "pt") as f:
            for name in f.keys():
                if is_lora_key(name):
                    lora[name] = f.get_tensor(name)
                elif checkpoint.is_extra_key(name):
                    out[name] = f.get_tensor(name)
    return out, lora
