"""Load a checkpoint folder as a DMS model: base weights, DMS settings and DMS parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import checkpoint
from .config import DMSConfig
from .torchtune_model import add_dms


@dataclass
class DMSModel:
    model: nn.Module  # torchtune TransformerDecoder with DMS attached
    tokenizer: Any
    dms: DMSConfig
    hf_config: Dict[str, Any]
    family: str
    dms_trained: bool  # the checkpoint carried DMS settings (a retrofit), not defaults


def load_dms_model(folder, *, dms_overrides: Optional[Dict[str, Any]] = None, dtype=torch.float32,
                   device="cpu", max_seq_len: Optional[int] = None) -> DMSModel:
    """DMS settings come from config.json's `dms_*` keys when present (a retrofit or the released
    format), else the defaults of DMSConfig; `dms_overrides` (DMSConfig field names) win over both."""
    loaded = checkpoint.load_hf_checkpoint(folder, dtype=dtype, max_seq_len=max_seq_len)
    trained = "dms_window_size" in loaded.hf_config
    cfg = DMSConfig.from_hf(loaded.hf_config) if trained else DMSConfig()
    if dms_overrides:
        cfg = cfg.replace(**dms_overrides)
    model = add_dms(loaded.model, cfg)
    if trained or loaded.extra_state:
        load_dms_state(model, loaded.extra_state, source=str(folder))
    # else: a base model starting a retrofit; adapters (if any) stay zero-initialised
    model.to(device=device)
    return DMSModel(model=model.eval(), tokenizer=loaded.tokenizer, dms=cfg, hf_config=loaded.hf_config,
                    family=loaded.family, dms_trained=trained)


def load_dms_state(model: nn.Module, extra_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load DMS parameters (Hugging Face names) into a model that add_dms prepared."""
    expected = {k for k in model.state_dict() if checkpoint.is_extra_key(k)}
    given = {checkpoint.hf_extra_name_to_tune(k): v for k, v in extra_state.items()}
    if expected and not given:
        raise ValueError(f"the DMS settings ask for the adapter variant but {source} has no DMS adapter weights "
                         f"(expected e.g. {checkpoint.tune_extra_name_to_hf(sorted(expected)[0])}); retrofit first "
                         f"or use decision=borrowed")
    if given and set(given) != expected:
        missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
        raise ValueError(f"DMS parameters in {source} do not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if given:
        model.load_state_dict(given, strict=False)


def dms_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """DMS parameters under Hugging Face names, for save_hf_checkpoint's extra_state."""
    return {checkpoint.tune_extra_name_to_hf(k): v for k, v in model.state_dict().items()
            if checkpoint.is_extra_key(k)}
