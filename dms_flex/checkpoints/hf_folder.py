"""Load and save Hugging Face checkpoint folders as torchtune ``TransformerDecoder`` models.

``load_hf_checkpoint(folder)`` reads a Hugging Face folder (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with their index, or one PyTorch state
dict), builds the matching torchtune decoder (`hf_config.build_decoder`) and loads the weights
through torchtune's own key converters (`keys`).

Tensors whose name contains ``dms`` (DMS adapter parameters) are not part of the base model; they
are returned untouched in ``LoadedModel.extra_state`` under their Hugging Face names, and
`load_extra_state` loads them into a model that DMS prepared.

``save_hf_checkpoint`` is the inverse and writes the folder atomically (`atomic`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn

from .atomic import make_readable, write_folder_atomically  # noqa: F401 - make_readable: dms_flex.hf reads it here
from .hf_config import FAMILY_TO_ARCH, CONFIG_NAME, build_decoder, default_dtype, model_family, read_hf_config
from .keys import clean_tune_key, hf_to_tune, is_extra_key, tune_extra_name_to_hf, tune_to_hf
from .lora import LoRADelta, LoRASettings, check_lora, is_lora_key, merge_lora

__all__ = [
    "LoadedModel",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "build_expected_hf_shapes",
    "load_extra_state",
    "weight_files",
    "read_weights",
    "safetensors_errors",
]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    # LoRA factors (`lora`): those merged into the weights (lora="merge" or a LoRADelta), or the folder's
    # own left unmerged (lora="keep": the retrofit resuming a checkpoint); None without LoRA.
    lora: Optional[LoRADelta] = None
    lora_merged: bool = False


def load_extra_state(
    model: nn.Module,
    state: Dict[str, torch.Tensor],
    source: str,
    decision: str,
    shown: Callable[[str], str] = lambda name: name,
) -> None:
    """Load DMS parameters, named as in `model`, into a model that DMS prepared (torchtune or Hugging
    Face). Refuses an adapter-variant model with no parameters given and a set of names that differs
    from the model's; `shown` spells a model name as the checkpoint does, for the error."""
    expected = {k for k in model.state_dict() if is_extra_key(k)}
    if expected and not state:
        raise ValueError(
            f"the DMS settings ask for the adapter variant but {source} has no DMS adapter weights "
            f"(expected e.g. {shown(sorted(expected)[0])}); retrofit first or use decision='borrowed'"
        )
    if state and set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"DMS parameters in {source} do not match the model (decision={decision!r}): missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}"
        )
    if state:
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
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
    hint = (
        (
            f" It has {', '.join(others)}: re-save the model with transformers' "
            f"save_pretrained(folder) (safetensors is its default format)."
        )
        if others
        else ""
    )
    raise FileNotFoundError(
        f"no weights in {folder}: expected {WEIGHTS_NAME}, or sharded model-*.safetensors files with "
        f"{WEIGHTS_INDEX_NAME}.{hint}"
    )


_weight_files = weight_files  # the name dms_flex.hf calls


def read_weights(folder: Path, cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    """HF-named tensors from safetensors files, or from one PyTorch state-dict file (`.pt`, `.pth`,
    `.bin`) with HF names or torchtune names (a torchtune-format checkpoint: converted here)."""
    from safetensors.torch import load_file

    try:
        files = weight_files(folder)
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
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}): it is damaged or incomplete (an "
            f"interrupted copy, download or save?); copy or save it again"
        ) from None


def _read_torch_state(path: Path, cfg: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise ValueError(f"{path} is not a PyTorch state dict that can be loaded safely: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # torchtune recipe checkpoints
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    sd = {clean_tune_key(k): v for k, v in sd.items()}
    if any(k.startswith(("layers.", "tok_embeddings.")) for k in sd):  # torchtune names
        extra = {tune_extra_name_to_hf(k): v for k, v in sd.items() if is_extra_key(k)}
        base = {k: v for k, v in sd.items() if not is_extra_key(k)}
        return {**tune_to_hf(base, cfg, family), **extra}
    return sd


def _fmt_names(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_hf_state(base: Dict[str, torch.Tensor], expected: Dict[str, torch.Size], folder: Path, arch: str) -> None:
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


def load_hf_checkpoint(
    folder, dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None, *, lora="merge"
) -> LoadedModel:
    """Load a Hugging Face Llama / Qwen2 checkpoint folder as a torchtune ``TransformerDecoder``.

    Args:
        folder: folder with ``config.json`` and ``model.safetensors`` (or sharded safetensors
            with ``model.safetensors.index.json``); tokenizer files are optional.
        dtype: dtype of the model's parameters (weights are cast on load).
        max_seq_len: the decoder's maximum sequence length (RoPE cache size); default
            ``max_position_embeddings`` from config.json.
        lora: the folder's own LoRA factors (`lora`), if any: "merge" them into the base weights (the
            model as trained), "keep" them unmerged in ``LoadedModel.lora``, or "ignore" them; or a
            `LoRADelta` (an adapter folder's) to merge instead.

    Raises:
        FileNotFoundError: folder, config.json or weights missing.
        ValueError: unsupported architecture or settings, or weights that do not match config.json.
    """
    folder = Path(folder).expanduser()
    cfg = read_hf_config(folder)
    family = model_family(cfg)
    arch = FAMILY_TO_ARCH[family]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    # Build without allocating or initialising weights; the checkpoint supplies them.
    with default_dtype(dtype), torch.device("meta"):
        model = build_decoder(cfg, max_seq_len=max_seq_len, family=family)
    max_seq_len = int(model.max_seq_len)

    state = read_weights(folder, cfg, family)
    own_lora = _own_lora(folder, cfg, {k: v for k, v in state.items() if is_lora_key(k)})
    extra = {k: v for k, v in state.items() if is_extra_key(k) and not is_lora_key(k)}
    base = {
        k: v for k, v in state.items() if not is_extra_key(k) and not is_lora_key(k) and "rotary_emb.inv_freq" not in k
    }
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        # Hugging Face ignores a stored lm_head when the embeddings are tied; so do we.
        base.pop("lm_head.weight", None)

    meta_sd = {k: v for k, v in model.state_dict().items()}
    expected = {k: v.shape for k, v in tune_to_hf(meta_sd, cfg, family).items()}
    _check_hf_state(base, expected, folder, arch)
    if lora not in ("merge", "keep", "ignore") and not isinstance(lora, LoRADelta):
        raise ValueError(f"lora must be 'merge', 'keep', 'ignore' or a LoRADelta, got {lora!r}")
    merged = own_lora if lora == "merge" else lora if isinstance(lora, LoRADelta) else None
    if merged is not None:
        check_lora(merged, expected, str(folder) if merged is own_lora else "the adapter")
        merge_lora(base, merged)

    tune_sd = hf_to_tune(base, cfg, family)
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

    return LoadedModel(
        model=model,
        tokenizer=_load_tokenizer(folder),
        hf_config=cfg,
        family=family,
        max_seq_len=max_seq_len,
        extra_state=extra,
        lora=merged if merged is not None else own_lora if lora == "keep" else None,
        lora_merged=merged is not None,
    )


def _own_lora(folder: Path, cfg: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Optional[LoRADelta]:
    """The folder's LoRA (settings from config.json, factors from its weights), checked to come together."""
    settings = LoRASettings.from_hf(cfg, source=str(folder / CONFIG_NAME))
    if (settings is None) != (not tensors):
        raise ValueError(
            f"{folder} has LoRA factors ({next(iter(tensors))}) but no dms_lora_* keys in config.json"
            if tensors
            else f"{folder / CONFIG_NAME} has dms_lora_* keys but the weights hold no LoRA factors"
        )
    return None if settings is None else LoRADelta(settings, tensors)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_hf_checkpoint(
    model: nn.Module,
    hf_config: Dict[str, Any],
    folder,
    family: str,
    extra_state: Optional[Dict[str, torch.Tensor]] = None,
    tokenizer=None,
    extra_files: Optional[Callable[[Path], None]] = None,
    carry_over: bool = True,
) -> Path:
    """Write a torchtune decoder as a Hugging Face folder (``config.json`` + ``model.safetensors``).

    Tensors of ``model`` whose name contains ``dms`` are saved under Hugging Face module paths
    (see :func:`tune_extra_name_to_hf`); ``extra_state`` (Hugging Face names) is added as is and
    wins on a name clash. The folder is written to a temporary sibling and renamed into place, so an
    interrupted save leaves a previous folder intact; ``extra_files(tmp)`` adds files to it before the
    rename (they appear together with the weights or not at all). ``carry_over``: keep the other files
    of a folder being replaced (tokenizer, generation config, ...). Returns the folder.
    """
    _check_family(hf_config, family)
    hf_sd = _hf_state_dict(model, hf_config, family)
    for k, v in (extra_state or {}).items():
        hf_sd[k] = v
    tensors = _unshared_cpu_tensors(hf_sd)
    config = dict(hf_config)
    config["architectures"] = [FAMILY_TO_ARCH[family]]
    float_dtypes = {
        t.dtype for k, t in tensors.items() if t.is_floating_point() and not is_extra_key(k) and not is_lora_key(k)
    }
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

    return write_folder_atomically(folder, fill, carry_over=carry_over)


def build_expected_hf_shapes(hf_config: Dict[str, Any], family: Optional[str] = None) -> Dict[str, torch.Size]:
    """Hugging Face tensor names and shapes of the base model that ``hf_config`` describes
    (without the tied ``lm_head.weight``). Costs no memory (built on the meta device)."""
    family = family or model_family(hf_config)
    with torch.device("meta"):
        model = build_decoder(hf_config, max_seq_len=1, family=family)
    return {k: v.shape for k, v in tune_to_hf(model.state_dict(), hf_config, family).items()}


def _check_family(hf_config, family: str) -> None:
    if family not in FAMILY_TO_ARCH:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILY_TO_ARCH)}")
    if not isinstance(hf_config, dict):
        raise ValueError(f"hf_config must be the config.json dict, got {type(hf_config).__name__}")
    cfg_family = model_family(hf_config)
    if cfg_family != family:
        raise ValueError(
            f"family {family!r} does not match hf_config, which describes a {cfg_family} "
            f"model ({FAMILY_TO_ARCH[cfg_family]})"
        )


def _hf_state_dict(model: nn.Module, hf_config: Dict[str, Any], family: str) -> Dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, checked against the shapes hf_config implies;
    DMS tensors (names containing 'dms') under their Hugging Face module paths."""
    tied = bool(hf_config.get("tie_word_embeddings", False))
    sd = {clean_tune_key(k): v for k, v in model.state_dict().items()}
    dms_sd = {k: v for k, v in sd.items() if is_extra_key(k)}
    base = {k: v for k, v in sd.items() if not is_extra_key(k)}
    if tied and "output.weight" in base:
        if not torch.equal(base["output.weight"], base.get("tok_embeddings.weight", torch.empty(0))):
            raise ValueError(
                "hf_config says tie_word_embeddings=true but the model's output weight "
                "differs from its token embeddings: set tie_word_embeddings to false"
            )
        base.pop("output.weight")
    if not tied and "output.weight" not in base:
        raise ValueError(
            "the model's output projection is tied to its embeddings but hf_config says "
            "tie_word_embeddings=false: set it to true"
        )
    try:
        hf_sd = tune_to_hf(base, hf_config, family)
    except Exception as e:  # torchtune raises a bare Exception for an unknown key
        raise ValueError(
            f"the model has parameters that a {family} Hugging Face checkpoint cannot "
            f"hold ({e}); only names containing 'dms' may be added to the base model"
        ) from e
    for name, shape in build_expected_hf_shapes(hf_config, family).items():
        if name not in hf_sd:
            raise ValueError(f"the model lacks {name} that hf_config describes")
        if tuple(hf_sd[name].shape) != tuple(shape):
            raise ValueError(
                f"shape mismatch for {name}: the model has {tuple(hf_sd[name].shape)}, "
                f"hf_config implies {tuple(shape)}; the model does not match hf_config"
            )
    for k, v in dms_sd.items():
        hf_sd[tune_extra_name_to_hf(k)] = v
    return hf_sd


def _unshared_cpu_tensors(hf_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage are cloned (safetensors refuses shared storage)."""
    tensors: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for k, v in hf_sd.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        tensors[k] = t
    return tensors
