"""DMS adapter folders: export, read, check that one fits a model.

An adapter-variant retrofit that trained only the adapter (``tune run dms_retrofit
dms.decision=adapter train_adapter_only=true``) changes nothing but the small DMS adapter, so the
adapter alone, applied to the unmodified base, reproduces the whole retrofit.
:func:`export_adapter` writes it as an *adapter folder*:

- ``dms_adapter.safetensors``: the DMS parameters under Hugging Face names
  (``model.layers.{i}.self_attn.dms_adapter.{norm,linear}.weight``), dtype as trained;
- ``dms_config.json``: the checkpoint's ``dms_*`` settings, plus provenance (``base_model``: the
  base's name and shape as config.json gives them; ``base_verified``: whether the base weights were
  checked against the base folder at export);
- ``dms_lora.safetensors`` (a retrofit with ``lora.enabled=true`` only): the LoRA factors of the
  frozen base (`lora`: Hugging Face names, fp32), with ``dms_lora_*`` in dms_config.json; loaders merge
  them into the base weights (:func:`read_adapter_lora`).

``dms_flex.checkpoints.load_dms_model(base, adapter=folder)`` applies it. On the command line::

    python -m dms_flex.checkpoints export-adapter CHECKPOINT OUT [--base BASE]
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..config import DMSConfig
from ..torchtune_model import add_dms
from .atomic import write_folder_atomically
from .hf_config import build_decoder, default_dtype, model_family, read_hf_config, read_json_object
from .hf_folder import read_weights, safetensors_errors, weight_files
from .keys import is_extra_key, tune_extra_name_to_hf
from .lora import LORA_WEIGHTS_NAME, LoRADelta, LoRASettings, check_lora, is_lora_key

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_FORMAT",
    "read_adapter",
    "read_adapter_lora",
    "check_adapter_fits",
    "export_adapter",
]

ADAPTER_WEIGHTS_NAME = "dms_adapter.safetensors"
ADAPTER_CONFIG_NAME = "dms_config.json"
ADAPTER_FORMAT = 1
# config.json keys that shape the base model's computation: a checkpoint whose base these differ from
# is not that base plus an adapter, even with equal weights.
_MODEL_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
)
_PROVENANCE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_key_value_heads",
    "vocab_size",
)


def read_adapter(folder) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(dms_config.json as a dict, DMS parameters under Hugging Face names) of an adapter folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"adapter folder {folder} does not exist (or is not a folder): pass a folder "
            f"written by `python -m dms_flex.checkpoints export-adapter`"
        )
    cfg_path, weights = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
    if missing:
        hint = (
            f" It holds config.json: a full checkpoint folder, which --checkpoint takes; export its adapter with "
            f"`python -m dms_flex.checkpoints export-adapter {folder} OUT`"
            if (folder / "config.json").is_file()
            else " Write one with `python -m dms_flex.checkpoints export-adapter CHECKPOINT OUT`"
        )
        raise FileNotFoundError(f"{folder} is not a DMS adapter folder: it lacks {' and '.join(missing)}.{hint}")
    cfg = read_json_object(cfg_path, "export the adapter again")
    dms = DMSConfig.from_hf(cfg, source=str(cfg_path))
    if dms.decision != "adapter":
        raise ValueError(
            f"{cfg_path} says dms_decision={dms.decision!r}; an adapter folder holds adapter-variant "
            f"parameters (dms_decision 'adapter')"
        )
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ValueError(f"{weights} cannot be read as safetensors ({e}): export the adapter again") from None
    foreign = sorted(k for k in state if not is_extra_key(k))
    if foreign or not state:
        raise ValueError(
            f"{weights} must hold only DMS parameters (names containing 'dms'), found "
            f"{foreign[:4] if foreign else 'no tensors'}"
        )
    return cfg, state


def read_adapter_lora(folder, cfg: Dict[str, Any]) -> Optional[LoRADelta]:
    """The LoRA of an adapter folder (None when it has none); `cfg` is its dms_config.json (read_adapter)."""
    folder = Path(folder).expanduser()
    settings = LoRASettings.from_hf(cfg, source=str(folder / ADAPTER_CONFIG_NAME))
    path = folder / LORA_WEIGHTS_NAME
    if settings is None:
        if path.is_file():
            raise ValueError(f"{folder} has {LORA_WEIGHTS_NAME} but no dms_lora_* keys in {ADAPTER_CONFIG_NAME}")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{folder / ADAPTER_CONFIG_NAME} names a LoRA (dms_lora_rank) but {path} is missing")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} cannot be read as safetensors ({e}): export the adapter again") from None
    foreign = sorted(k for k in tensors if not is_lora_key(k))
    if foreign or not tensors:
        raise ValueError(f"{path} must hold only LoRA factors (*.lora_A/B.weight), found {foreign[:4] or 'none'}")
    return LoRADelta(settings, tensors)


def _expected_dms_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {tune_extra_name_to_hf(k): tuple(v.shape) for k, v in model.state_dict().items() if is_extra_key(k)}


def _describe_base(info: Optional[Dict[str, Any]]) -> str:
    if not isinstance(info, dict) or not info:
        return "an unrecorded base model"
    name = info.get("name")
    dims = ", ".join(f"{k} {info[k]}" for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads") if k in info)
    return f"{name or 'an unnamed base model'}{f' ({dims})' if dims else ''}"


def check_adapter_fits(
    model: nn.Module,
    state: Dict[str, torch.Tensor],
    *,
    adapter="the adapter",
    model_folder="the model",
    provenance: Optional[Dict[str, Any]] = None,
) -> None:
    """ValueError unless `state` (Hugging Face names) has exactly the DMS parameters of `model`, shapes
    included; the message names the first difference and the base the adapter was exported from."""
    expected = _expected_dms_shapes(model)
    origin = f"; the adapter was exported from {_describe_base(provenance)}: apply it to that base model"
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter {adapter} does not fit the model in {model_folder}: it has {len(state)} DMS tensors, "
            f"the model needs {len(expected)} ({len(model.layers)} layers); missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}{origin}"
        )
    for name, shape in sorted(expected.items()):
        got = tuple(state[name].shape)
        if got != shape:
            attn = model.layers[0].attn
            raise ValueError(
                f"adapter {adapter} does not fit the model in {model_folder}: {name} has shape {got} in "
                f"the adapter, the model (hidden size {attn.embed_dim}, {attn.num_kv_heads} KV heads) "
                f"needs {shape}{origin}"
            )


@contextlib.contextmanager
def _weight_reader(folder: Path):
    """Yields (names, get): the Hugging Face tensor names of a checkpoint folder's weights, and a
    function reading one tensor (safetensors files are read tensor by tensor, not all at once)."""
    cfg = read_hf_config(folder)
    family = model_family(cfg)
    try:
        files = weight_files(folder)
    except FileNotFoundError:
        files = None
    if files is None:  # one torch state dict (a torchtune-format folder): read whole
        state = read_weights(folder, cfg, family)
        yield list(state), state.__getitem__
        return
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        where: Dict[str, Any] = {}
        for f in files:
            with safetensors_errors(f):
                handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for name in handle.keys():
                where[name] = (handle, f)

        def get(name):
            handle, f = where[name]
            with safetensors_errors(f):
                return handle.get_tensor(name)

        yield list(where), get


def _base_names(names: Iterable[str], cfg: Dict[str, Any]) -> set:
    out = {n for n in names if not is_extra_key(n) and not is_lora_key(n) and "rotary_emb.inv_freq" not in n}
    if cfg.get("tie_word_embeddings", False):
        out.discard("lm_head.weight")  # ignored on load when tied
    return out


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, allowing one to be the other stored in a lower precision (bf16 final vs fp32 base)."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    return torch.equal(a.to(b.dtype), b) or torch.equal(b.to(a.dtype), a)


def _check_same_base(ckpt_folder: Path, ckpt_cfg: Dict[str, Any], base_folder: Path) -> Dict[str, Any]:
    """ValueError unless the checkpoint's base model equals base_folder's; returns base's config."""
    base_cfg = read_hf_config(base_folder)
    refuse = (
        f"the adapter alone would not reproduce {ckpt_folder} on {base_folder} (an all-weights retrofit, or "
        f"another base model); use the whole checkpoint folder instead"
    )
    if model_family(base_cfg) != model_family(ckpt_cfg):
        raise ValueError(
            f"{ckpt_folder} is a {model_family(ckpt_cfg)} model, {base_folder} a "
            f"{model_family(base_cfg)} model: {refuse}"
        )
    for key in _MODEL_KEYS:
        if ckpt_cfg.get(key) != base_cfg.get(key):
            raise ValueError(
                f"config.json's {key} differs: {ckpt_cfg.get(key)!r} in {ckpt_folder}, "
                f"{base_cfg.get(key)!r} in {base_folder}: {refuse}"
            )
    with _weight_reader(ckpt_folder) as (c_names, c_get), _weight_reader(base_folder) as (b_names, b_get):
        c_base, b_base = _base_names(c_names, ckpt_cfg), _base_names(b_names, base_cfg)
        if c_base != b_base:
            diff = sorted(c_base ^ b_base)
            raise ValueError(
                f"the base weights of {ckpt_folder} and {base_folder} have different tensor names "
                f"(e.g. {diff[:3]}): {refuse}"
            )
        differing = [n for n in sorted(c_base) if not _same_weights(c_get(n), b_get(n))]
    if differing:
        raise ValueError(
            f"the base weights of {ckpt_folder} differ from those of {base_folder} in {len(differing)} "
            f"of {len(c_base)} tensors (e.g. {differing[:3]}): {refuse}"
        )
    return base_cfg


def _write_adapter_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Create `folder` atomically (write_folder_atomically); an existing adapter folder
    (one holding dms_config.json) is replaced whole, only once the new one is complete."""
    return write_folder_atomically(folder, fill, carry_over=False, marker=ADAPTER_CONFIG_NAME, kind="an adapter folder")


def export_adapter(checkpoint_folder, out_folder, *, base_folder=None) -> Path:
    """Write the DMS adapter of an adapter-variant retrofit checkpoint as an adapter folder
    (``dms_adapter.safetensors`` + ``dms_config.json``, see the module docstring); returns it.

    With `base_folder` (the model the retrofit started from) the checkpoint's base weights are
    checked to equal base_folder's (allowing a lower-precision copy, e.g. a bf16 final folder of an
    fp32 base): only then does the adapter alone reproduce the checkpoint. Without it nothing can
    check that the retrofit froze the base (``train_adapter_only=true``).

    Raises:
        FileNotFoundError: a folder, config.json or weights file is missing.
        ValueError: not a DMS checkpoint; the borrowed variant (its decisions live in the base q/k
            weights: no adapter to export); adapter parameters missing or not fitting config.json;
            base weights that differ from base_folder's; `out_folder` an existing non-adapter folder.
    """
    ckpt_folder = Path(checkpoint_folder).expanduser()
    cfg = read_hf_config(ckpt_folder)
    family = model_family(cfg)
    if "dms_window_size" not in cfg:
        raise ValueError(
            f"{ckpt_folder} is not a DMS checkpoint (its config.json has no dms_* keys): nothing to "
            f"export; retrofit it with `tune run dms_retrofit dms.decision=adapter train_adapter_only=true`"
        )
    dms = DMSConfig.from_hf(cfg, source=str(ckpt_folder / "config.json"))
    if dms.decision != "adapter":
        raise ValueError(
            f"{ckpt_folder} is a {dms.decision}-variant DMS checkpoint: its decisions live in the base "
            f"model's q/k weights, not in adapter parameters, so an adapter alone cannot carry them; "
            f"use the whole checkpoint folder (an adapter exists only for dms.decision=adapter)"
        )
    with default_dtype(torch.float32), torch.device("meta"):
        skeleton = add_dms(build_decoder(cfg, max_seq_len=1, family=family), dms)
    with _weight_reader(ckpt_folder) as (names, get):
        state = {n: get(n).contiguous() for n in names if is_extra_key(n) and not is_lora_key(n)}
        lora_tensors = {n: get(n).contiguous() for n in names if is_lora_key(n)}
    if not state:
        raise ValueError(
            f"{ckpt_folder} says dms_decision=adapter but holds no DMS adapter parameters "
            f"(tensors named model.layers.N.self_attn.dms_adapter.*)"
        )
    check_adapter_fits(skeleton, state, adapter=ckpt_folder, model_folder=f"{ckpt_folder}'s config.json")
    lora_settings = LoRASettings.from_hf(cfg, source=str(ckpt_folder / "config.json"))
    if (lora_settings is None) != (not lora_tensors):
        raise ValueError(f"{ckpt_folder}: LoRA factors and the dms_lora_* keys of config.json must come together")
    if lora_settings is not None:
        from .hf_folder import build_expected_hf_shapes

        check_lora(LoRADelta(lora_settings, lora_tensors), build_expected_hf_shapes(cfg, family), str(ckpt_folder))
    base_cfg = _check_same_base(ckpt_folder, cfg, Path(base_folder).expanduser()) if base_folder is not None else {}

    name = next((c.get(k) for c in (cfg, base_cfg) for k in ("_name_or_path", "_model_name_or_path") if c.get(k)), None)
    provenance = {"name": name, **{k: cfg[k] for k in _PROVENANCE_KEYS if k in cfg}}
    out_cfg = {
        **{k: v for k, v in sorted(cfg.items()) if k.startswith("dms_")},
        "adapter_format": ADAPTER_FORMAT,
        "base_model": provenance,
        "base_verified": base_folder is not None,
    }

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        if lora_tensors:
            save_file(lora_tensors, str(tmp / LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(out_cfg, indent=2) + "\n")

    return _write_adapter_folder(Path(out_folder), fill)
