"""Saving: step_NNNNNN/ (fp32 weights + recipe_state.pt, an exact resume) and final/ (weights in
save_dtype), both Hugging Face folders with the DMS settings in config.json and the run record, written
atomically (the folder appears whole or not at all); the RNG states a recipe state carries."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dms_flex import checkpoints as ckpt
from dms_flex.checkpoints import pretrained
from dms_flex.checkpoints.lora import is_lora_key, lora_to_hf
from dms_flex.config import DMSConfig

from .config_checks import RecipeError
from .run_record import RECIPE_STATE, RUN_RECORD


class StateDictView:
    """What save_hf_checkpoint and dms_state_dict read from a model: its state dict. Lets a gathered
    (FSDP) or re-typed state dict be saved without building a second model."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        self._sd = sd

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self._sd


def checkpoint_weights(sd: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The student's weights under their model names: base weights in `dtype`, DMS parameters and LoRA
    factors in fp32."""
    trained = lambda k: ckpt.is_extra_key(k) or is_lora_key(k)  # noqa: E731
    return {
        k.removeprefix("student."): (
            v.to(dtype) if v.is_floating_point() and not trained(k) else v.float() if v.is_floating_point() else v
        )
        for k, v in sd.items()
    }


def checkpoint_hf_config(
    hf_config: Dict[str, Any], dms: DMSConfig, kv_int8: bool, base_weights: str, lora=None
) -> Dict[str, Any]:
    """config.json: the model's keys and the DMS keys (plus the quantization the run trained with, and
    the LoRA settings `lora`, whose factors the checkpoint holds unmerged)."""
    out = {**hf_config, **dms.to_hf(), **(lora.to_hf() if lora is not None else {})}
    if kv_int8:  # informational: generate defaults --kv to int8
        out["dms_kv_dtype"] = "int8"
    if base_weights != "none":  # informational: generate defaults --weight-quant to it
        out["dms_weight_quant"] = base_weights
    return out


def write_checkpoint(
    folder: Path,
    weights: Dict[str, torch.Tensor],
    hf_config: Dict[str, Any],
    family: str,
    tokenizer,
    state: Optional[Dict[str, Any]],
    record: Dict[str, Any],
    final: bool,
) -> None:
    """One checkpoint folder, atomically: weights, config.json, tokenizer files, the run record and
    (step folders) the recipe state. LoRA factors are saved unmerged, under Hugging Face names."""
    factors = lora_to_hf({k: v for k, v in weights.items() if is_lora_key(k)}, hf_config, family)
    view = StateDictView({k: v for k, v in weights.items() if not is_lora_key(k)})

    def extra_files(tmp: Path) -> None:  # written with the weights: the folder appears whole or not at all
        if state is not None:
            torch.save(state, tmp / RECIPE_STATE)
        (tmp / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")

    try:
        ckpt.save_hf_checkpoint(
            view,
            hf_config,
            folder,
            family,
            extra_state={**pretrained.dms_state_dict(view), **factors},
            tokenizer=tokenizer,
            extra_files=extra_files,
            carry_over=final,
        )
    except ValueError as e:
        raise RecipeError(f"cannot save {folder}: {e}") from None


def rng_state(noise: torch.Generator, device: torch.device) -> Dict[str, Any]:
    """Every random state a resumed run needs: the eviction noise, torch (CPU, CUDA), Python, NumPy."""
    return {
        "noise": noise.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng(rng: Dict[str, Any], noise: torch.Generator, device: torch.device) -> None:
    noise.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def gather_state(
    step, optimizer, noise, device, distributed: bool, is_rank_zero: bool, world_size: int, base_originals,
    with_optimizer: bool,
):  # fmt: skip
    """(model state dict, optimizer state (None without `with_optimizer`), every rank's RNG state), full
    on rank 0. A quantized base is saved as the full-precision weights it was quantized from
    (`base_originals`)."""
    if distributed:
        from torchtune import training

        sd = training.gather_cpu_state_dict(step, is_rank_zero, device=device)
        opt = None
        if with_optimizer:  # a collective: every rank takes the same branch
            opt = training.get_full_optimizer_state_dict(step, optimizer, is_rank_zero, device=device)
        rng = [None] * world_size
        torch.distributed.all_gather_object(rng, rng_state(noise, device))
        return sd, opt, rng
    sd = {k: base_originals.get(k, v) for k, v in step.state_dict().items()}
    return sd, (optimizer.state_dict() if with_optimizer else None), [rng_state(noise, device)]


def load_optimizer_state(step, optimizer, state, distributed: bool, is_rank_zero: bool) -> None:
    """A checkpoint's full optimizer state into the optimizer (FSDP: read on rank 0, sharded to all)."""
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            step,
            optimizer,
            state if is_rank_zero else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
    else:
        optimizer.load_state_dict(state)
