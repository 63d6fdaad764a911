"""The recipe's config: packaged config names (`--config tiny`), validation before anything is built,
and the clear one-line messages (`RecipeError`) for what is wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

import dms_flex
from dms_flex import data as dms_data
from dms_flex.checkpoints.lora import LoRAError, LoRASettings
from dms_flex.config import DMSConfig

CONFIG_DIR = Path(dms_flex.__file__).resolve().parent / "configs"
_CONFIG_NAME = None  # the bare name given to --config, for messages

KNOWN_KEYS = {
    "hf_repo",
    "checkpoint_dir",
    "model",
    "tokenizer",
    "dataset",
    "max_seq_len",
    "split_across_rows",
    "shuffle",
    "seed",
    "dms",
    "train_adapter_only",
    "optimizer",
    "lr_scheduler",
    "clip_grad_norm",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "dtype",
    "device",
    "enable_activation_checkpointing",
    "compile",
    "kd_chunk_size",
    "kd_temperature",
    "log_lm_loss",
    "output_dir",
    "save_every_n_steps",
    "save_dtype",
    "resume_from",
    "eval_batches",
    "metric_logger",
    "log_every_n_steps",
    "fsdp_reshard_after_forward",
    "quant",
    "overwrite",
    "zeroing_steps",
    "dataset_repeat",
    "lora",
    # benchmarks (dms_flex/retrofit/random_init.py, timing.py)
    "benchmark",
    "benchmark_warmup_steps",
    "timing",
    "random_init",
    "random_init_config",
    "synthetic_data",
}
BASE_WEIGHT_QUANT = ("none", "int8", "nf4")


class RecipeError(Exception):
    """A problem with the user's set-up or config; printed as one message, without a traceback."""


def validate_config(cfg: DictConfig) -> None:
    """Clear errors for the recipe's own keys before anything is built."""
    for key in cfg:
        node = cfg.get(key)
        if key not in KNOWN_KEYS and not (isinstance(node, DictConfig) and "_component_" in node):
            raise RecipeError(
                f"unknown config key {key!r}; the recipe reads {sorted(KNOWN_KEYS)} (and building "
                f"blocks with a _component_)"
            )
    for key in (
        "tokenizer",
        "dataset",
        "optimizer",
        "metric_logger",
        "dms",
        "max_seq_len",
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "output_dir",
        "dtype",
    ):
        if cfg.get(key, None) is None:
            raise RecipeError(f"the config lacks {key!r}")

    def positive_int(key):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecipeError(f"{key}={v!r} is invalid: it must be an integer >= 1")

    for key in ("max_seq_len", "max_steps", "batch_size", "gradient_accumulation_steps"):
        positive_int(key)
    for key in ("save_every_n_steps",):
        if cfg.get(key, None) is not None:
            positive_int(key)
    for key, allowed in (("dtype", ("bf16", "fp32")), ("save_dtype", ("bf16", "fp32"))):
        if cfg.get(key, "bf16") not in allowed:
            raise RecipeError(f"{key}={cfg.get(key)!r} is invalid: it must be one of {allowed}")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise RecipeError(f"overwrite={cfg.get('overwrite')!r} is invalid: it must be true or false")
    clip = cfg.get("clip_grad_norm", None)
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0):
        raise RecipeError(f"clip_grad_norm={clip!r} is invalid: it must be a number > 0 or null")
    if not isinstance(cfg.dms, DictConfig):
        raise RecipeError("dms must be a mapping of DMSConfig fields (window, decision, final_cr, ...)")
    DMSConfig.from_dict(OmegaConf.to_container(cfg.dms, resolve=True))  # raises DMSConfigError with the field


def quant_settings(cfg: DictConfig) -> Tuple[bool, str]:
    """The `quant:` section: kv_int8 (bool, default false), base_weights (none|int8|nf4, default none)."""
    q = cfg.get("quant", None)
    if q is None:
        return False, "none"
    if not isinstance(q, DictConfig):
        raise RecipeError("quant must be a mapping: {kv_int8: true|false, base_weights: none|int8|nf4}")
    unknown = sorted(set(q.keys()) - {"kv_int8", "base_weights"})
    if unknown:
        raise RecipeError(
            f"unknown key(s) quant.{', quant.'.join(unknown)}; quant takes kv_int8 (true|false) and "
            f"base_weights ({'|'.join(BASE_WEIGHT_QUANT)})"
        )
    kv = q.get("kv_int8", False)
    if not isinstance(kv, bool):
        raise RecipeError(f"quant.kv_int8={kv!r} is invalid: it must be true or false")
    base = q.get("base_weights", "none")
    base = "none" if base is None else str(base)
    if base not in BASE_WEIGHT_QUANT:
        raise RecipeError(f"quant.base_weights={base!r} is invalid: it must be one of {'|'.join(BASE_WEIGHT_QUANT)}")
    return kv, base


def training_mode(cfg: DictConfig, dms: DMSConfig) -> Tuple[bool, bool, str]:
    """(train_adapter_only, quant.kv_int8, quant.base_weights), checked against dms.decision."""
    adapter_only = bool(cfg.get("train_adapter_only", False))
    if adapter_only and dms.decision != "adapter":
        raise RecipeError(
            "train_adapter_only=true needs dms.decision=adapter: the borrowed-neuron variant has "
            "no adapter, it always trains all weights"
        )
    kv_int8, base_weights = quant_settings(cfg)
    if base_weights != "none" and not (adapter_only and dms.decision == "adapter"):
        raise RecipeError(
            f"quant.base_weights={base_weights} quantizes a frozen base: it needs "
            f"train_adapter_only=true and dms.decision=adapter (got train_adapter_only="
            f"{str(adapter_only).lower()}, dms.decision={dms.decision})"
        )
    return adapter_only, kv_int8, base_weights


def zeroing_steps(cfg: DictConfig, dms: DMSConfig) -> int:
    """zeroing_steps (default 0): the distillation-only steps that scale the borrowed channel's weights
    from 1 to 0 before the CR schedule (docs/design.md, "Losses and schedule"); 0 for the adapter
    variant, which borrows no channel."""
    n = cfg.get("zeroing_steps", 0)
    n = 0 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RecipeError(f"zeroing_steps={n!r} is invalid: it must be an integer >= 0 (0: no zeroing phase)")
    return n if dms.decision == "borrowed" else 0


LORA_KEYS = ("enabled", "rank", "alpha", "modules", "dropout")


def lora_settings(cfg: DictConfig, dms: DMSConfig, adapter_only: bool, base_weights: str) -> Optional[LoRASettings]:
    """The `lora:` section (None: off): torchtune LoRA on the frozen base of an adapter-only run."""
    node = cfg.get("lora", None)
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise RecipeError(f"lora must be a mapping of {list(LORA_KEYS)}, got {node!r}")
    unknown = sorted(set(node.keys()) - set(LORA_KEYS))
    if unknown:
        raise RecipeError(f"unknown key(s) lora.{', lora.'.join(unknown)}; lora takes {', '.join(LORA_KEYS)}")
    enabled = node.get("enabled", False)
    if not isinstance(enabled, bool):
        raise RecipeError(f"lora.enabled={enabled!r} is invalid: it must be true or false")
    if not enabled:
        return None
    if not (adapter_only and dms.decision == "adapter"):
        raise RecipeError(
            f"lora.enabled=true trains LoRA on a frozen base: it needs dms.decision=adapter and "
            f"train_adapter_only=true (got dms.decision={dms.decision}, train_adapter_only={str(adapter_only).lower()})"
        )
    if base_weights != "none":
        raise RecipeError(f"lora.enabled=true with quant.base_weights={base_weights} is not supported: use one")
    modules = node.get("modules", None)
    modules = tuple(OmegaConf.to_container(modules)) if modules is not None else LoRASettings.modules
    try:
        return LoRASettings(
            rank=node.get("rank", LoRASettings.rank),
            alpha=node.get("alpha", LoRASettings.alpha),
            modules=modules,
            dropout=node.get("dropout", 0.0),
        )
    except LoRAError as e:
        raise RecipeError(str(e)) from None
    except TypeError:
        raise RecipeError(f"lora.modules={node.get('modules')!r} is invalid: it must be a list of names") from None


def check_distributed(base_weights: str) -> None:
    if base_weights != "none":
        raise RecipeError(
            f"quant.base_weights={base_weights} runs on one device (the adapter-only "
            f"retrofit of a quantized base is sized for one GPU); FSDP over several ranks shards "
            f"plain weights only: drop --nproc_per_node or set quant.base_weights=none"
        )


def missing_weights_message(cfg: DictConfig, folder: Path) -> str:
    name = _CONFIG_NAME or "this config"
    repo = cfg.get("hf_repo", None) or "<organisation>/<model>"
    return (
        f"config '{name}' expects the Hugging Face-format weights of {repo} in\n"
        f"    {folder}\n"
        f"but {'that folder has no config.json or weights' if folder.is_dir() else 'that folder does not exist'}.\n"
        f"Get them (gated models need a Hugging Face token with access) with:\n"
        f"    tune download {repo} --output-dir {folder} --hf-token $HF_TOKEN\n"
        f"The folder must hold config.json, model*.safetensors (with model.safetensors.index.json when sharded) "
        f"and the tokenizer files; Meta's original/ files that `tune download` adds are not used.\n"
        f"Weights elsewhere: add checkpoint_dir=/path/to/folder to the command."
    )


def check_weights_present(cfg: DictConfig) -> None:
    if cfg.get("checkpoint_dir", None) is not None and not (Path(cfg.checkpoint_dir) / "config.json").is_file():
        raise RecipeError(missing_weights_message(cfg, Path(cfg.checkpoint_dir)))


def resolve_paths(cfg: DictConfig) -> None:
    """`checkpoint_dir: smollm2` is the embedded model; paths get `~` expanded (interpolations such as
    ${checkpoint_dir} then see the resolved value)."""
    cfg.output_dir = str(Path(os.path.expanduser(str(cfg.output_dir))).absolute())
    value = cfg.get("checkpoint_dir", None)
    if value is not None:
        try:
            cfg.checkpoint_dir = str(dms_data.resolve_model_dir(value))
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise RecipeError(str(e)) from None


def resolve_device(name: str, distributed: bool) -> torch.device:
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError("device=cuda but torch sees no CUDA device: use device=cpu (or auto)")
        if distributed:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(name)


def instantiate(node, what: str, *args, **kwargs):
    """torchtune's config.instantiate, its errors as one RecipeError naming what was being built."""
    from torchtune import config
    from torchtune.config._errors import InstantiationError

    try:
        return config.instantiate(node, *args, **kwargs)
    except InstantiationError as e:
        raise RecipeError(f"cannot build {what} ({node.get('_component_')}): {e}") from None
    except ModuleNotFoundError as e:
        raise RecipeError(f"cannot build {what}: {e}") from None
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise RecipeError(f"cannot build {what} ({node.get('_component_')}): {e}") from None


def packaged_configs() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def map_config_argument(argv: List[str]) -> List[str]:
    """--config NAME -> the packaged yaml when NAME is not a file (torchtune passes it as a path)."""
    global _CONFIG_NAME
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            j, value = i + 1, argv[i + 1]
        elif a.startswith("--config="):
            j, value = i, a.split("=", 1)[1]
        else:
            continue
        _CONFIG_NAME = Path(value).stem
        if not os.path.isfile(value):
            if value in packaged_configs():
                path = str(CONFIG_DIR / f"{value}.yaml")
            elif "/" in value or value.endswith((".yaml", ".yml")):
                raise RecipeError(f"--config {value}: no such file")
            else:
                raise RecipeError(
                    f"--config {value}: not a file and not a packaged config; packaged: {', '.join(packaged_configs())}"
                )
            argv[j] = path if a == "--config" else f"--config={path}"
        break
    return argv
