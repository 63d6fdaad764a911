"""Load a checkpoint folder as a DMS model: base weights, DMS settings and DMS parameters.

``load_dms_model(folder)`` takes a Hugging Face folder (a base model, a retrofit, or a released DMS
checkpoint); ``load_dms_model(base, adapter=folder)`` applies an adapter folder (see `adapter`). LoRA
factors (a retrofit with ``lora.enabled=true``, in the folder or the adapter) are merged into the base
weights on load (`lora`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..config import DMSConfig
from ..torchtune_model import add_dms
from .adapter import ADAPTER_CONFIG_NAME, check_adapter_fits, read_adapter, read_adapter_lora
from .hf_folder import load_extra_state, load_hf_checkpoint
from .keys import hf_extra_name_to_tune, is_extra_key, tune_extra_name_to_hf

__all__ = ["DMSModel", "load_dms_model", "load_dms_state", "dms_state_dict"]


@dataclass
class DMSModel:
    model: nn.Module  # torchtune TransformerDecoder with DMS attached
    tokenizer: Any
    dms: DMSConfig
    hf_config: Dict[str, Any]  # config.json; with an adapter, its dms_* keys replace the folder's
    family: str
    dms_trained: bool  # the checkpoint (or the adapter) carried DMS settings (a retrofit), not defaults
    adapter: Optional[Path] = None  # the adapter folder applied, if any
    lora: Optional[Any] = None  # the LoRASettings merged into the base weights, if any


def load_dms_model(
    folder,
    *,
    dms_overrides: Optional[Dict[str, Any]] = None,
    dtype=torch.float32,
    device="cpu",
    max_seq_len: Optional[int] = None,
    adapter=None,
    merge_lora: bool = True,
) -> DMSModel:
    """DMS settings come from config.json's `dms_*` keys when present (a retrofit or the released
    format), else the defaults of DMSConfig; `dms_overrides` (DMSConfig field names) win over both.

    `adapter`: a folder written by :func:`export_adapter`. Its dms_config.json then supplies the DMS
    settings (`dms_overrides` still win) and its parameters are loaded into the model, its LoRA factors
    (if any) merged into the base weights; `folder`'s own DMS settings, parameters and LoRA, if any, are
    ignored. Raises FileNotFoundError / ValueError when the
    adapter folder is incomplete or does not fit the model.

    `merge_lora=False`: LoRA factors (the folder's or the adapter's) are left out: the base weights as they
    were before the retrofit (what an evaluation compares a LoRA student against)."""
    adapter_cfg = adapter_state = None
    lora = "merge" if merge_lora else "ignore"  # the folder's own LoRA, if any
    if adapter is not None:
        adapter = Path(adapter).expanduser()
        adapter_cfg, adapter_state = read_adapter(adapter)  # before the (larger) model: fail fast
        lora = (read_adapter_lora(adapter, adapter_cfg) if merge_lora else None) or "ignore"
    loaded = load_hf_checkpoint(folder, dtype=dtype, max_seq_len=max_seq_len, lora=lora)
    hf_config = loaded.hf_config
    if adapter_cfg is not None:
        hf_config = {
            **{k: v for k, v in hf_config.items() if not k.startswith("dms_")},
            **{k: v for k, v in adapter_cfg.items() if k.startswith("dms_")},
        }
    trained = "dms_window_size" in hf_config
    source = str(adapter / ADAPTER_CONFIG_NAME) if adapter_cfg is not None else str(Path(folder) / "config.json")
    cfg = DMSConfig.from_hf(hf_config, source=source) if trained else DMSConfig()
    if dms_overrides:
        cfg = cfg.replace(**dms_overrides)
    if adapter_state is not None and cfg.decision != "adapter":
        raise ValueError(
            f"the adapter {adapter} needs decision=adapter, but the DMS settings ask for "
            f"decision={cfg.decision}; drop that override or the adapter"
        )
    model = add_dms(loaded.model, cfg)
    if adapter_state is not None:
        check_adapter_fits(
            model, adapter_state, adapter=adapter, model_folder=folder, provenance=adapter_cfg.get("base_model")
        )
        load_dms_state(model, adapter_state, source=str(adapter))
    elif trained or loaded.extra_state:
        load_dms_state(model, loaded.extra_state, source=str(folder))
    # else: a base model starting a retrofit; adapters (if any) stay zero-initialised
    model.to(device=device)
    return DMSModel(
        model=model.eval(),
        tokenizer=loaded.tokenizer,
        dms=cfg,
        hf_config=hf_config,
        family=loaded.family,
        dms_trained=trained,
        adapter=adapter,
        lora=loaded.lora.settings if loaded.lora_merged else None,
    )


def load_dms_state(model: nn.Module, extra_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load DMS parameters (Hugging Face names) into a model that add_dms prepared."""
    given = {hf_extra_name_to_tune(k): v for k, v in extra_state.items()}
    cfg = getattr(model, "dms_config", None)
    load_extra_state(model, given, source, cfg.decision if cfg is not None else "none", shown=tune_extra_name_to_hf)


def dms_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """DMS parameters under Hugging Face names, for save_hf_checkpoint's extra_state."""
    return {tune_extra_name_to_hf(k): v for k, v in model.state_dict().items() if is_extra_key(k)}
