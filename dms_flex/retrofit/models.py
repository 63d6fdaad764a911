"""The student and the teacher: the original model (a Hugging Face folder or a randomly initialised
`model` component), a retrofit checkpoint, the frozen base (adapter-only runs, optionally held
quantized or with torchtune LoRA on it), and FSDP2 sharding over several ranks."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dms_flex import checkpoints as ckpt
from dms_flex.checkpoints import pretrained
from dms_flex.checkpoints.lora import LoRASettings, apply_lora, lora_to_tune
from dms_flex.config import DMSConfig
from dms_flex.torchtune_model import add_dms

from .config_checks import RecipeError, missing_weights_message


def load_folder(folder: Path, dtype, cfg: DictConfig, original: bool, lora: str = "merge"):
    if original and not (folder / "config.json").is_file():
        raise RecipeError(missing_weights_message(cfg, folder))
    try:
        return ckpt.load_hf_checkpoint(folder, dtype=dtype, max_seq_len=int(cfg.max_seq_len), lora=lora)
    except FileNotFoundError as e:
        raise RecipeError(missing_weights_message(cfg, folder) if original else str(e)) from None
    except ValueError as e:
        raise RecipeError(f"cannot load {folder}: {e}") from None


def model_from_folder(
    folder: Path, dtype, cfg: DictConfig, dms: DMSConfig, lora: Optional[LoRASettings] = None
) -> nn.Module:
    """A retrofit checkpoint (ours): base weights plus DMS parameters, and the LoRA factors unmerged
    (torchtune LoRALinear layers) when the run trains LoRA."""
    loaded = load_folder(folder, dtype, cfg, original=False, lora="keep")
    model = add_dms(loaded.model, dms)
    pretrained.load_dms_state(model, loaded.extra_state, source=str(folder))
    if lora is not None:
        if loaded.lora is None or loaded.lora.settings != LoRASettings(lora.rank, lora.alpha, lora.modules):
            raise RecipeError(f"{folder} does not hold the LoRA this run trains ({lora})")
        apply_lora(model, lora)
        factors = lora_to_tune(loaded.lora.tensors, loaded.hf_config, loaded.family)
        result = model.load_state_dict({k: v.float() for k, v in factors.items()}, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k], result
    return model


def original_model(
    cfg: DictConfig, dms: DMSConfig, tokenizer, seed: int, dtype: torch.dtype, device: Optional[torch.device] = None
) -> Tuple[nn.Module, Dict[str, Any], str]:
    """(model, config.json, family): the model before retrofit, on CPU, DMS attached: from
    checkpoint_dir (loaded in `dtype`), or random init from the `model` component (checkpoint_dir: null).
    random_init=true (a benchmark, dms_flex/retrofit/random_init.py): hf_repo's architecture with random
    weights, built in `dtype` on `device`."""
    if cfg.get("random_init", False):
        from .random_init import build_random_model

        model, hf_config, family = build_random_model(cfg, seed, dtype, device or torch.device("cpu"))
        return add_dms(model, dms), hf_config, family
    if cfg.get("checkpoint_dir", None) is None:
        from torchtune import config

        if cfg.get("model", None) is None:
            raise RecipeError(
                "the config needs checkpoint_dir (a Hugging Face folder) or a `model` component (random initialisation)"
            )
        model_cfg = cfg.model
        if str(model_cfg.get("vocab_size", "auto")) == "auto":
            model_cfg = OmegaConf.merge(model_cfg, {"vocab_size": tokenizer.vocab_size})
        torch.manual_seed(seed)  # the same initial weights on every rank and every resume
        model = config.instantiate(model_cfg)
        hf_config = hf_config_of(model, tokenizer)
        return add_dms(model, dms), hf_config, "llama"
    loaded = load_folder(Path(cfg.checkpoint_dir), dtype, cfg, original=True)
    model = add_dms(loaded.model, dms)
    if loaded.extra_state and dms.decision == "adapter":  # continuing from a DMS checkpoint
        pretrained.load_dms_state(model, loaded.extra_state, source=str(cfg.checkpoint_dir))
    hf_config = {k: v for k, v in loaded.hf_config.items() if not k.startswith("dms_")}
    return model, hf_config, loaded.family


def hf_config_of(model: nn.Module, tokenizer) -> Dict[str, Any]:
    """config.json for a decoder built from a Llama component builder (random init)."""
    from torchtune.modules import RotaryPositionalEmbeddings

    attn = model.layers[0].attn
    if type(attn.pos_embeddings) is not RotaryPositionalEmbeddings:
        raise RecipeError(
            "random initialisation (checkpoint_dir: null) supports Llama builders with plain RoPE, "
            "e.g. torchtune.models.llama3._component_builders.llama3"
        )
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": model.tok_embeddings.embedding_dim,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.num_kv_heads,
        "intermediate_size": model.layers[0].mlp.w1.out_features,
        "rms_norm_eps": float(model.norm.eps),
        "rope_theta": float(attn.pos_embeddings.base),
        "max_position_embeddings": int(model.max_seq_len),
        "tie_word_embeddings": hasattr(model.output, "tied_module"),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    expected = ckpt.build_expected_hf_shapes(hf)
    if sum(math.prod(s) for s in expected.values()) != sum(p.numel() for p in model.parameters()):
        raise RecipeError("the `model` component has parameters a Llama config.json cannot describe")
    return hf


def freeze_base(student: nn.Module, distributed: bool, compute_dtype: torch.dtype) -> None:
    """train_adapter_only: only the DMS parameters (and LoRA factors, if any) train; on one device the
    frozen weights drop to the compute dtype (they need no fp32 master copy; FSDP wants one dtype per unit)."""
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    dms = {name for name, _ in student.named_parameters() if ckpt.is_extra_key(name)}
    set_trainable_params(student, dms | set(get_adapter_params(student)))
    if not distributed:
        for name, p in student.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(compute_dtype)


def quantize_base(
    student: nn.Module, base_weights: str, compute_dtype: torch.dtype, log: Callable[[str], None], keep: bool = True
) -> Dict[str, torch.Tensor]:
    """quant.base_weights: the frozen base's linear layers held quantized (torchao int8 weight-only,
    or NF4 as torchtune's QLoRA recipes hold theirs); the DMS adapter stays full precision. The
    student with eviction off is also the teacher, so both see the same quantized base.
    Returns the full-precision weights that were quantized (on CPU): checkpoints save those, so
    they stay plain Hugging Face folders and `generate --weight-quant` re-derives the same
    quantized values. keep=False (a benchmark, which saves nothing): none are kept."""
    from dms_flex import quant

    plain = (
        {}
        if not keep
        else {
            f"{n}.weight": m.weight.detach().to("cpu", copy=True)
            for n, m in student.named_modules()
            if isinstance(m, nn.Linear) and "dms_adapter" not in n
        }
    )
    if base_weights == "int8":
        quant.quantize_weights(student, "int8")
        skipped = []
    else:
        skipped = quant.quantize_weights_nf4(student)
    names = quant.quantized_weight_names(student)
    log(
        f"quant.base_weights={base_weights}: {len(names)} linear weights quantized"
        + (f"; left in {compute_dtype} (size not NF4-blockable): {', '.join(skipped)}" if skipped else "")
    )
    return {f"student.{n}": plain[n] for n in names if n in plain}


# ---- FSDP2 -------------------------------------------------------------------------------------------
def meta_student(cfg: DictConfig, hf_config: Dict[str, Any], family: str, dms: DMSConfig) -> nn.Module:
    """A meta-device student (fp32) to shard; its weights arrive in load_full_state."""
    with torch.device("meta"):
        if cfg.get("checkpoint_dir", None) is None and not cfg.get("random_init", False):
            from torchtune import config

            model_cfg = OmegaConf.merge(cfg.model, {"vocab_size": hf_config["vocab_size"]})
            student = config.instantiate(model_cfg)
        else:
            student = ckpt.build_decoder(hf_config, max_seq_len=int(cfg.max_seq_len), family=family)
        return add_dms(student, dms)


def shard(step: nn.Module, device: torch.device, world_size: int, reshard_after_forward: bool) -> None:
    """Attention projections and MLPs of every layer are FSDP units: forward_train calls them
    as modules, so their hooks gather and free them. Embeddings, norms, the output projection and
    the DMS adapters stay in the root unit (RetrofitStep), which is whole during its forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import register_fsdp_forward_method
    from torchtune import training

    unit = re.compile(r"^student\.layers\.\d+\.(attn\.(q_proj|k_proj|v_proj|output_proj)|mlp)$")
    mesh = init_device_mesh(device.type, (world_size,))
    training.shard_model(
        step,
        [lambda name, module: bool(unit.match(name))],
        cpu_offload=False,
        reshard_after_forward=reshard_after_forward,
        dp_mesh=mesh,
    )
    register_fsdp_forward_method(step, "measure")


def load_full_state(step: nn.Module, student: nn.Module, full_model: Optional[nn.Module], device: torch.device) -> None:
    """The sharded student's weights from `full_model` (rank 0's; None on the other ranks)."""
    # torch's distributed state-dict API directly: torchtune 0.6.1's loader needs the full state
    # dict on every rank, this one reads it on rank 0 and broadcasts the shards.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torchtune import training

    with torch.device(device):
        for m in student.modules():
            if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                m.rope_init()
    full = {}
    if full_model is not None:
        full = {f"student.{k}": v.to(device, torch.float32) for k, v in full_model.state_dict().items()}
    set_model_state_dict(
        step, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    training.validate_no_params_on_meta_device(step)
    torch.distributed.barrier()
