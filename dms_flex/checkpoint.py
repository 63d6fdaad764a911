"""Load and save Hugging Face checkpoints as torchtune ``TransformerDecoder`` models.

``load_hf_checkpoint(folder)`` reads a Hugging Face folder (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with their index), builds the matching
torchtune decoder with torchtune's component builders and loads the weights through torchtune's
own key converters:

=====================================  ==================================================
config.json                            torchtune builder
=====================================  ==================================================
Llama, untied, plain RoPE              ``llama3._component_builders.llama3``
Llama, untied, rope type "llama3"      ``llama3_1._component_builders.llama3_1``
Llama, tied embeddings                 ``llama3_2._component_builders.llama3_2`` (scale 1
                                       without rope scaling: the same as plain RoPE)
Qwen2 (tied or untied)                 ``qwen2._component_builders.qwen2``
=====================================  ==================================================

Llama checkpoints store q/k projections in Hugging Face's "rotate half" RoPE layout; torchtune's
Llama RoPE rotates interleaved pairs, and ``hf_to_tune`` permutes the q/k rows accordingly.
torchtune's Qwen2 RoPE uses the rotate-half layout itself, so Qwen2 weights are not permuted.

Tensors whose name contains ``dms`` (DMS adapter parameters, e.g.
``model.layers.0.self_attn.dms_adapter.linear.weight``) are not part of the base model; they are
returned untouched in ``LoadedModel.extra_state`` under their Hugging Face names.
``hf_extra_name_to_tune`` / ``tune_extra_name_to_hf`` translate such names between the two
module trees.

``save_hf_checkpoint`` is the inverse and writes the folder atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn

__all__ = [
    "LoadedModel",
    "SUPPORTED_ARCHITECTURES",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "build_decoder",
    "build_expected_hf_shapes",
    "read_hf_config",
    "model_family",
    "is_extra_key",
    "hf_extra_name_to_tune",
    "tune_extra_name_to_hf",
]

#: Hugging Face ``architectures`` entries this module can load, and the family each one maps to.
SUPPORTED_ARCHITECTURES: Dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_FAMILY_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Files of an existing folder that a save replaces (everything else is carried over).
_WEIGHT_FILE_RE = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")
_SUPPORTED_ROPE = ("default", "llama3")
#: the temporary names an interrupted atomic save leaves behind: `.NAME.tmp-XXXX` (a folder or file being
#: written) and `.NAME.old-XXXX` (the folder being replaced, between the two renames)
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9A-Za-z_]+$")


@dataclass
class LoadedModel:
    """What :func:`load_hf_checkpoint` returns."""

    model: nn.Module  # torchtune TransformerDecoder, in eval mode
    tokenizer: Any  # transformers tokenizer, or None when the folder has no tokenizer files
    hf_config: Dict[str, Any]  # config.json as a dict
    family: str  # "llama" or "qwen2"
    max_seq_len: int
    # Tensors that are not part of the base model (names containing "dms"), Hugging Face names,
    # dtype as stored in the checkpoint.
    extra_state: Dict[str, torch.Tensor] = field(default_factory=dict)


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
            "config.json has per-layer-type rope parameters; only one RoPE setting for all layers "
            "is supported"
        )
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope_type not in _SUPPORTED_ROPE:
        raise ValueError(
            f"unsupported rope type {rope_type!r} in config.json; supported: "
            f"{', '.join(_SUPPORTED_ROPE)} (no scaling, or Llama-3.1 style 'llama3' scaling)"
        )
    return rope_type, float(theta), params


def _dims(cfg: Dict[str, Any]) -> Dict[str, int]:
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
    return dict(dim=dim, num_heads=num_heads, num_kv_heads=num_kv, head_dim=dim // num_heads,
                num_layers=layers, vocab_size=vocab, intermediate_dim=inter)


def _check_common(cfg: Dict[str, Any], family: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    if family == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported for Llama (torchtune's "
                                 f"Llama builders have no biases)")
    if family == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported (torchtune's "
                             "Qwen2 builder attends to the full context)")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"config.json: only full_attention layers are supported, found "
                             f"{sorted(set(layer_types))}")


# --------------------------------------------------------------------------------------------
# building the decoder
# --------------------------------------------------------------------------------------------


def build_decoder(hf_config: Dict[str, Any], max_seq_len: Optional[int] = None,
                  family: Optional[str] = None) -> nn.Module:
    """Build (randomly initialised, on the current default device and dtype) the torchtune
    ``TransformerDecoder`` that ``config.json`` describes."""
    family = family or model_family(hf_config)
    _check_common(hf_config, family)
    d = _dims(hf_config)
    if max_seq_len is None:
        max_seq_len = int(hf_config.get("max_position_embeddings") or 4096)
    max_seq_len = int(max_seq_len)
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    rope_type, theta, rope_params = _rope_settings(hf_config)
    norm_eps = float(hf_config.get("rms_norm_eps", 1e-6))
    tied = bool(hf_config.get("tie_word_embeddings", False))
    common = dict(vocab_size=d["vocab_size"], num_layers=d["num_layers"], num_heads=d["num_heads"],
                  num_kv_heads=d["num_kv_heads"], embed_dim=d["dim"], max_seq_len=max_seq_len,
                  intermediate_dim=d["intermediate_dim"], norm_eps=norm_eps, rope_base=theta)

    if family == "qwen2":
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported for Qwen2 "
                             f"(only plain RoPE)")
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


def _set_llama3_rope_details(model: nn.Module, params: Dict[str, Any], theta: float,
                             head_dim: int, max_seq_len: int) -> None:
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
    rope = Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=theta,
                            scale_factor=float(params.get("factor", 1.0)), low_freq_factor=low,
                            high_freq_factor=high, old_context_len=old)
    for layer in model.layers:
        layer.attn.pos_embeddings = rope


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def is_extra_key(name: str) -> bool:
    """True for tensors that are not part of the base model (DMS parameters)."""
    return "dms" in name.lower()


def load_extra_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str, decision: str,
                     shown: Callable[[str], str] = lambda name: name) -> None:
    """Load DMS parameters, named as in `model`, into a model that DMS prepared (torchtune or Hugging
    Face). Refuses an adapter-variant model with no parameters given and a set of names that differs
    from the model's; `shown` spells a model name as the checkpoint does, for the error."""
    expected = {k for k in model.state_dict() if is_extra_key(k)}
    if expected and not state:
        raise ValueError(f"the DMS settings ask for the adapter variant but {source} has no DMS adapter weights "
                         f"(expected e.g. {shown(sorted(expected)[0])}); retrofit first or use decision='borrowed'")
    if state and set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"DMS parameters in {source} do not match the model (decision={decision!r}): missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    if state:
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys


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


def _clean_tune_key(name: str) -> str:
    # activation checkpointing and torch.compile wrappers add these to state-dict names
    return name.replace("._checkpoint_wrapped_module", "").replace("_orig_mod.", "")


def _hf_to_tune(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    d = _dims(cfg)
    kw = dict(num_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"], dim=d["dim"], head_dim=d["head_dim"])
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(sd, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **kw)
    from torchtune.models.convert_weights import hf_to_tune

    return hf_to_tune(sd, **kw)


def _tune_to_hf(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    d = _dims(cfg)
    kw = dict(num_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"], dim=d["dim"], head_dim=d["head_dim"])
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(sd, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **kw)
    from torchtune.models.convert_weights import tune_to_hf

    return tune_to_hf(sd, **kw)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} in {folder} names shard file(s) that are missing: {', '.join(missing)}; "
                f"copy the complete checkpoint (all shards) into the folder"
            )
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        return shards
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".ckpt"))
    hint = (f" It has {', '.join(others)}: re-save the model with transformers' "
            f"save_pretrained(folder) (safetensors is its default format).") if others else ""
    raise FileNotFoundError(
        f"no weights in {folder}: expected {WEIGHTS_NAME}, or sharded model-*.safetensors files with "
        f"{WEIGHTS_INDEX_NAME}.{hint}"
    )


def _read_weights(folder: Path, cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    """HF-named tensors from safetensors files, or from one PyTorch state-dict file (`.pt`, `.pth`,
    `.bin`) with HF names or torchtune names (a torchtune-format checkpoint: converted here)."""
    from safetensors.torch import load_file

    try:
        files = _weight_files(folder)
    except FileNotFoundError:
        torch_files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
        if len(torch_files) != 1:
            raise
        return _read_torch_state(torch_files[0], cfg, family)
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        with safetensors_errors(f):
            part = load_file(str(f))
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"tensor {sorted(dup)[0]!r} appears in more than one weights file of {folder}")
        state.update(part)
    return state


@contextlib.contextmanager
def safetensors_errors(path) -> Iterator[None]:
    """A damaged safetensors file (truncated, random bytes) as a ValueError that names it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is damaged or incomplete (an "
                         f"interrupted copy, download or save?); copy or save it again") from None


def _read_torch_state(path: Path, cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise ValueError(f"{path} is not a PyTorch state dict that can be loaded safely: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # torchtune recipe checkpoints
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    sd = {_clean_tune_key(k): v for k, v in sd.items()}
    if any(k.startswith(("layers.", "tok_embeddings.")) for k in sd):  # torchtune names
        extra = {tune_extra_name_to_hf(k): v for k, v in sd.items() if is_extra_key(k)}
        base = {k: v for k, v in sd.items() if not is_extra_key(k)}
        return {**_tune_to_hf(base, cfg, family), **extra}
    return sd


def _fmt_names(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_hf_state(base: Dict[str, torch.Tensor], expected: Dict[str, torch.Size], folder: Path,
                    arch: str) -> None:
    missing = expected.keys() - base.keys()
    if missing:
        raise ValueError(
            f"the weights in {folder} lack {len(missing)} tensor(s) that config.json's {arch} needs: "
            f"{_fmt_names(missing)}. The weights are incomplete or config.json belongs to another model."
        )
    unexpected = base.keys() - expected.keys()
    if unexpected:
        raise ValueError(
            f"the weights in {folder} hold {len(unexpected)} tensor(s) that a {arch} with this "
            f"config.json does not have: {_fmt_names(unexpected)}. Check that config.json belongs to "
            f"these weights (tensors whose name contains 'dms' are accepted as extra_state)."
        )
    for name, shape in sorted(expected.items()):
        got = tuple(base[name].shape)
        if got != tuple(shape):
            raise ValueError(
                f"shape mismatch for {name}: the weights file has {got}, config.json implies "
                f"{tuple(shape)}. config.json and the weights in {folder} do not belong together."
            )


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_hf_checkpoint(folder, dtype: torch.dtype = torch.float32,
                       max_seq_len: Optional[int] = None) -> LoadedModel:
    """Load a Hugging Face Llama / Qwen2 checkpoint folder as a torchtune ``TransformerDecoder``.

    Args:
        folder: folder with ``config.json`` and ``model.safetensors`` (or sharded safetensors
            with ``model.safetensors.index.json``); tokenizer files are optional.
        dtype: dtype of the model's parameters (weights are cast on load).
        max_seq_len: the decoder's maximum sequence length (RoPE cache size); default
            ``max_position_embeddings`` from config.json.

    Raises:
        FileNotFoundError: folder, config.json or weights missing.
        ValueError: unsupported architecture or settings, or weights that do not match config.json.
    """
    folder = Path(folder).expanduser()
    cfg = read_hf_config(folder)
    family = model_family(cfg)
    arch = _FAMILY_TO_ARCH[family]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    # Build without allocating or initialising weights; the checkpoint supplies them.
    with _default_dtype(dtype), torch.device("meta"):
        model = build_decoder(cfg, max_seq_len=max_seq_len, family=family)
    max_seq_len = int(model.max_seq_len)

    state = _read_weights(folder, cfg, family)
    extra = {k: v for k, v in state.items() if is_extra_key(k)}
    base = {k: v for k, v in state.items() if not is_extra_key(k) and "rotary_emb.inv_freq" not in k}
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        # Hugging Face ignores a stored lm_head when the embeddings are tied; so do we.
        base.pop("lm_head.weight", None)

    meta_sd = {k: v for k, v in model.state_dict().items()}
    expected = {k: v.shape for k, v in _tune_to_hf(meta_sd, cfg, family).items()}
    _check_hf_state(base, expected, folder, arch)

    tune_sd = _hf_to_tune(base, cfg, family)
    tune_sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tune_sd.items()}
    model.load_state_dict(tune_sd, strict=True, assign=True)

    # RoPE buffers are computed, not loaded: build them for real now (they were skipped on meta).
    for module in model.modules():
        if hasattr(module, "rope_init"):
            with torch.device("cpu"):
                module.rope_init()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - would be a torchtune change
        raise RuntimeError(f"internal error: tensors left on the meta device: {leftover}")
    model.eval()

    return LoadedModel(model=model, tokenizer=_load_tokenizer(folder), hf_config=cfg, family=family,
                       max_seq_len=max_seq_len, extra_state=extra)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_folder_atomically(folder, fill: Callable[[Path], None], *, carry_over: bool = True,
                             marker: str = CONFIG_NAME, kind: str = "a checkpoint") -> Path:
    """Create ``folder`` by running ``fill(tmp)`` on a temporary folder in the same parent, then
    renaming it into place. An existing ``folder`` stays untouched until the new one is complete;
    it is then swapped out by two renames (its files other than weights and the ones just written,
    e.g. tokenizer or generation config, are carried over when ``carry_over``). A non-empty
    existing folder is only replaced when it holds ``marker`` (it is ``kind``)."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is a file: pass a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).exists():
        raise ValueError(
            f"{folder} exists, is not empty and holds no {marker}: refusing to replace a folder "
            f"that is not {kind}; pass a new or empty folder"
        )
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        fill(tmp)
        make_readable(tmp)  # mkdtemp's 0700 (and safetensors' 0600 files) would hide it from others
        if carry_over and folder.is_dir():
            written = {p.name for p in tmp.iterdir()}
            for entry in folder.iterdir():
                if entry.name in written or _WEIGHT_FILE_RE.match(entry.name) or TEMP_NAME_RE.match(entry.name):
                    continue  # replaced, or left by an interrupted save
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        _fsync_tree(tmp)
        if folder.exists():
            old = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def make_readable(root) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would (0777 / 0666 less the
    umask): mkdtemp makes 0700 folders and safetensors writes 0600 files, unreadable to the group
    and others although the folder around them is readable."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    if not root.is_dir():
        root.chmod((0o666 & ~umask) | (root.stat().st_mode & 0o111))
        return
    root.chmod(0o777 & ~umask)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 & ~umask) | (os.stat(path).st_mode & 0o111))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_hf_checkpoint(model: nn.Module, hf_config: Dict[str, Any], folder, family: str,
                       extra_state: Optional[Dict[str, torch.Tensor]] = None, tokenizer=None,
                       extra_files: Optional[Callable[[Path], None]] = None, carry_over: bool = True) -> Path:
    """Write a torchtune decoder as a Hugging Face folder (``config.json`` + ``model.safetensors``).

    Tensors of ``model`` whose name contains ``dms`` are saved under Hugging Face module paths
    (see :func:`tune_extra_name_to_hf`); ``extra_state`` (Hugging Face names) is added as is and
    wins on a name clash. The folder is written to a temporary sibling and renamed into place, so an
    interrupted save leaves a previous folder intact; ``extra_files(tmp)`` adds files to it before the
    rename (they appear together with the weights or not at all). ``carry_over``: keep the other files
    of a folder being replaced (tokenizer, generation config, ...). Returns the folder.
    """
    if family not in _FAMILY_TO_ARCH:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(_FAMILY_TO_ARCH)}")
    if not isinstance(hf_config, dict):
        raise ValueError(f"hf_config must be the config.json dict, got {type(hf_config).__name__}")
    cfg_family = model_family(hf_config)
    if cfg_family != family:
        raise ValueError(f"family {family!r} does not match hf_config, which describes a {cfg_family} "
                         f"model ({_FAMILY_TO_ARCH[cfg_family]})")
    tied = bool(hf_config.get("tie_word_embeddings", False))

    sd = {_clean_tune_key(k): v for k, v in model.state_dict().items()}
    dms_sd = {k: v for k, v in sd.items() if is_extra_key(k)}
    base = {k: v for k, v in sd.items() if not is_extra_key(k)}
    if tied and "output.weight" in base:
        if not torch.equal(base["output.weight"], base.get("tok_embeddings.weight", torch.empty(0))):
            raise ValueError("hf_config says tie_word_embeddings=true but the model's output weight "
                             "differs from its token embeddings: set tie_word_embeddings to false")
        base.pop("output.weight")
    if not tied and "output.weight" not in base:
        raise ValueError("the model's output projection is tied to its embeddings but hf_config says "
                         "tie_word_embeddings=false: set it to true")
    try:
        hf_sd = _tune_to_hf(base, hf_config, family)
    except Exception as e:  # torchtune raises a bare Exception for an unknown key
        raise ValueError(f"the model has parameters that a {family} Hugging Face checkpoint cannot "
                         f"hold ({e}); only names containing 'dms' may be added to the base model") from e
    expected = build_expected_hf_shapes(hf_config, family)
    for name, shape in expected.items():
        if name not in hf_sd:
            raise ValueError(f"the model lacks {name} that hf_config describes")
        if tuple(hf_sd[name].shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {name}: the model has {tuple(hf_sd[name].shape)}, "
                             f"hf_config implies {tuple(shape)}; the model does not match hf_config")
    for k, v in dms_sd.items():
        hf_sd[tune_extra_name_to_hf(k)] = v
    for k, v in (extra_state or {}).items():
        hf_sd[k] = v

    tensors: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for k, v in hf_sd.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        tensors[k] = t

    config = dict(hf_config)
    config["architectures"] = [_FAMILY_TO_ARCH[family]]
    float_dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not is_extra_key(k)}
    if len(float_dtypes) == 1:
        name = _dtype_name(float_dtypes.pop())
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        config["dtype"] = name

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra_files is not None:
            extra_files(tmp)

    return _write_folder_atomically(folder, fill, carry_over=carry_over)


def build_expected_hf_shapes(hf_config: Dict[str, Any], family: Optional[str] = None) -> Dict[str, torch.Size]:
    """Hugging Face tensor names and shapes of the base model that ``hf_config`` describes
    (without the tied ``lm_head.weight``). Costs no memory (built on the meta device)."""
    family = family or model_family(hf_config)
    with torch.device("meta"):
        model = build_decoder(hf_config, max_seq_len=1, family=family)
    return {k: v.shape for k, v in _tune_to_hf(model.state_dict(), hf_config, family).items()}
