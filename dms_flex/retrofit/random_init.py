"""Benchmark runs of the recipe: random weights of a config's real architecture and synthetic packed rows.

    tune run dms_retrofit --config llama3_8b checkpoint_dir=null random_init=true benchmark=true max_steps=6

measures speed and memory of the 8B retrofit with no weights, tokenizer or data on the machine:

- `random_init: true` builds the architecture of the config's `hf_repo` (its config.json fields, below in
  `ARCHITECTURES`, optionally changed by a `random_init_config:` mapping of config.json fields) with the same
  torchtune builder a real checkpoint of it gets (`dms_flex.checkpoints.build_decoder`), seeded, directly on
  the training device. It needs `checkpoint_dir: null` and `benchmark: true`.
- `synthetic_data: true` (implied by random_init) replaces the tokenizer and the dataset: documents of random
  tokens, lengths drawn uniformly from [min_tokens, max_tokens] (default 1,024-12,288: several documents per
  32,768-token row), packed by the recipe's own packing (dms_flex/data/packing.py) into rows with document
  ids, so that the document masks are those of real packed data. `synthetic_data: {min_tokens: N, max_tokens: M}`
  sets the range.
- `benchmark: true` is the gate: it writes no checkpoint (no step_NNNNNN/, no final/, no heat map), refuses
  resume_from, skips the before/after compression measurement, and writes `benchmark.json` in output_dir:
  tokens/s per GPU over the steps after `benchmark_warmup_steps` (default 1), the step-time split
  (`timing`, default on under benchmark; dms_flex/retrofit/timing.py) and the peak memory of every rank.
  Nothing a benchmark writes can be mistaken for a trained model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config_checks import RecipeError

# config.json fields of the models the packaged configs retrofit (as published on the Hugging Face hub)
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.2-1B-Instruct": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_scaling": _LLAMA3_ROPE,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-3B-Instruct": {
        **_LLAMA3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_scaling": _LLAMA3_ROPE,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
DEFAULT_DOCUMENT_TOKENS = (1024, 12288)


@dataclass(frozen=True)
class BenchmarkSettings:
    """The benchmark keys of a config, checked (`benchmark_settings`)."""

    enabled: bool = False  # benchmark: true
    random_init: bool = False
    synthetic: Optional[Tuple[int, int]] = None  # document length range of synthetic data, None: the config's data
    warmup_steps: int = 0  # steps left out of benchmark.json's throughput and split
    timing: bool = False  # the step-time split (dms_flex/retrofit/timing.py)


def _flag(cfg: DictConfig, key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    v = default if v is None else v
    if not isinstance(v, bool):
        raise RecipeError(f"{key}={v!r} is invalid: it must be true or false")
    return v


def benchmark_settings(cfg: DictConfig) -> BenchmarkSettings:
    """benchmark, benchmark_warmup_steps, timing, random_init, random_init_config, synthetic_data: checked
    together; random weights and synthetic data are refused outside benchmark=true."""
    enabled = _flag(cfg, "benchmark", False)
    random_init = _flag(cfg, "random_init", False)
    timing = _flag(cfg, "timing", enabled)
    if random_init:
        if not enabled:
            raise RecipeError(
                "random_init=true trains random weights: it is for measuring speed and memory only. Add "
                "benchmark=true (no checkpoint is written, nothing that could pass for a trained model)"
            )
        if cfg.get("checkpoint_dir", None) is not None:
            raise RecipeError(
                f"random_init=true builds random weights, but checkpoint_dir={cfg.checkpoint_dir} names real "
                f"ones: add checkpoint_dir=null"
            )
        architecture(cfg)  # a clear error now for an unknown hf_repo or bad random_init_config
    elif cfg.get("random_init_config", None) is not None:
        raise RecipeError("random_init_config changes the random architecture: it needs random_init=true")
    synthetic = _synthetic_range(cfg.get("synthetic_data", None), random_init)
    if synthetic is not None and not enabled:
        raise RecipeError("synthetic_data trains on random tokens: it needs benchmark=true")
    warmup = cfg.get("benchmark_warmup_steps", 1 if enabled else 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise RecipeError(f"benchmark_warmup_steps={warmup!r} is invalid: it must be an integer >= 0")
    if enabled:
        if cfg.get("resume_from", None) is not None:
            raise RecipeError("benchmark=true starts a fresh run and saves none: drop resume_from")
        if warmup >= int(cfg.max_steps) + int(cfg.get("zeroing_steps", 0) or 0):
            raise RecipeError(
                f"benchmark_warmup_steps={warmup} leaves no measured step of max_steps={cfg.max_steps}: "
                f"raise max_steps above it"
            )
    return BenchmarkSettings(enabled, random_init, synthetic, warmup, timing)


def _synthetic_range(node, random_init: bool) -> Optional[Tuple[int, int]]:
    if node is None or node is False:
        return DEFAULT_DOCUMENT_TOKENS if random_init else None
    if node is True:
        return DEFAULT_DOCUMENT_TOKENS
    if not isinstance(node, DictConfig) or set(node.keys()) - {"min_tokens", "max_tokens"}:
        raise RecipeError(
            f"synthetic_data={node!r} is invalid: true, or a mapping {{min_tokens: N, max_tokens: M}} "
            f"(document lengths, default {DEFAULT_DOCUMENT_TOKENS[0]}-{DEFAULT_DOCUMENT_TOKENS[1]})"
        )
    lo = node.get("min_tokens", DEFAULT_DOCUMENT_TOKENS[0])
    hi = node.get("max_tokens", DEFAULT_DOCUMENT_TOKENS[1])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 2 <= lo <= hi:
        raise RecipeError(
            f"synthetic_data min_tokens={lo!r}, max_tokens={hi!r} are invalid: integers with 2 <= min <= max"
        )
    return int(lo), int(hi)


def architecture(cfg: DictConfig) -> Dict[str, Any]:
    """config.json of the random model: ARCHITECTURES[hf_repo], updated by random_init_config."""
    repo = cfg.get("hf_repo", None)
    extra = cfg.get("random_init_config", None)
    if extra is not None and not isinstance(extra, DictConfig):
        raise RecipeError(f"random_init_config={extra!r} is invalid: it must be a mapping of config.json fields")
    extra = OmegaConf.to_container(extra, resolve=True) if extra is not None else {}
    if repo in ARCHITECTURES:
        hf = json.loads(json.dumps(ARCHITECTURES[repo]))  # a deep copy
    elif "architectures" in extra:
        hf = {}
    else:
        raise RecipeError(
            f"random_init=true builds the architecture of hf_repo, and hf_repo={repo!r} is not one this recipe "
            f"knows ({', '.join(ARCHITECTURES)}): set hf_repo to one of them, or give the whole config.json in "
            f"random_init_config (architectures, hidden_size, ...)"
        )
    hf.update(extra)
    from dms_flex.checkpoints.hf_config import dims, model_family

    try:
        model_family(hf)
        dims(hf)
    except ValueError as e:
        raise RecipeError(f"random_init_config: {e}") from None
    return hf


def build_random_model(cfg: DictConfig, seed: int, dtype: torch.dtype, device: torch.device):
    """(model, config.json, family): the architecture's torchtune decoder with random weights (seeded),
    built in `dtype` directly on `device` (an 8B model is built in seconds on a GPU, minutes on a CPU)."""
    from dms_flex.checkpoints.hf_config import build_decoder, default_dtype, model_family

    hf = architecture(cfg)
    family = model_family(hf)
    torch.manual_seed(seed)  # the same weights on every rank
    try:
        with torch.device(device), default_dtype(dtype):
            model = build_decoder(hf, max_seq_len=int(cfg.max_seq_len), family=family)
    except ValueError as e:
        raise RecipeError(f"random_init: {e}") from None
    hf.setdefault("pad_token_id", 0)
    return model, hf, family


# ---- synthetic data -------------------------------------------------------------------------------------
class SyntheticTokenizer:
    """What the recipe reads of a tokenizer when the data are synthetic: the vocabulary size and the ids."""

    hf = None  # no files: a benchmark writes no checkpoint, the only reader

    def __init__(self, vocab_size: int, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = int(vocab_size), bos_id, eos_id, pad_id


class SyntheticDocuments(torch.utils.data.Dataset):
    """`count` documents of random tokens (torchtune's {"tokens", "labels"}, every token trained), lengths
    uniform in [min_tokens, max_tokens]; document i depends only on (seed, i)."""

    def __init__(self, vocab_size: int, count: int, min_tokens: int, max_tokens: int, seed: int = 0):
        self.vocab_size, self.count, self.min_tokens, self.max_tokens, self.seed = (
            vocab_size,
            count,
            min_tokens,
            max_tokens,
            seed,
        )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.integers(self.min_tokens, self.max_tokens + 1))
        tokens = rng.integers(0, self.vocab_size, size=n, dtype=np.int64)
        return {"tokens": tokens, "labels": tokens}


def synthetic_vocab_size(cfg: DictConfig, settings: BenchmarkSettings) -> int:
    if settings.random_init:
        return int(architecture(cfg)["vocab_size"])
    if cfg.get("checkpoint_dir", None) is not None:
        from dms_flex.checkpoints.hf_config import read_hf_config

        return int(read_hf_config(Path(cfg.checkpoint_dir))["vocab_size"])
    model = cfg.get("model", None)
    if model is not None and isinstance(model.get("vocab_size", None), int):
        return int(model.vocab_size)
    raise RecipeError("synthetic_data needs the vocabulary size: from checkpoint_dir or model.vocab_size")


def make_tokenizer(cfg: DictConfig, settings: BenchmarkSettings):
    """The config's tokenizer, or with synthetic data a stand-in that needs no files."""
    if settings.synthetic is None:
        from .config_checks import instantiate

        return instantiate(cfg.tokenizer, "tokenizer")
    return SyntheticTokenizer(synthetic_vocab_size(cfg, settings))


def synthetic_dataset(cfg: DictConfig, settings: BenchmarkSettings, vocab_size: int, rows_needed: int, seed: int):
    """Enough synthetic documents to fill `rows_needed` rows of max_seq_len tokens."""
    lo, hi = settings.synthetic
    count = rows_needed * int(cfg.max_seq_len) // lo + 2
    return SyntheticDocuments(vocab_size, count, lo, hi, seed)


def variant_name(adapter_only: bool, base_weights: str, lora) -> str:
    """all | adapter | adapter_int8 | adapter_nf4 (| adapter_lora): the variants of the memory model
    (dms_flex/retrofit/memory_fit.py) and of benchmarks/bench_retrofit.py."""
    if not adapter_only:
        return "all"
    return "adapter" + ("" if base_weights == "none" else f"_{base_weights}") + ("_lora" if lora else "")


def benchmark_summary(
    cfg: DictConfig, adapter_only: bool, base_weights: str, lora, settings: Optional[BenchmarkSettings] = None
) -> Dict[str, Any]:
    """What a benchmark ran, as benchmark.json records it, with the model's shape and the prior memory
    model's coefficients (dms_flex/retrofit/memory_fit.py: the fit keeps the prior's slope for a single size).
    Empty when `settings` say neither benchmark nor timing."""
    from . import memory_fit

    if settings is not None and not (settings.enabled or settings.timing):
        return {}

    synthetic = cfg.get("synthetic_data", None)
    variant = variant_name(adapter_only, base_weights, lora)
    hf = None
    if cfg.get("random_init", False):
        hf = architecture(cfg)
    elif cfg.get("checkpoint_dir", None) is not None and (Path(cfg.checkpoint_dir) / "config.json").is_file():
        from dms_flex.checkpoints.hf_config import read_hf_config

        hf = read_hf_config(Path(cfg.checkpoint_dir))
    shape = prior = None
    if hf is not None:
        ckpt = bool(cfg.get("enable_activation_checkpointing", False))
        shape = memory_fit.shape_key(hf)
        prior = memory_fit.prior(
            hf, variant, 1, ckpt, int(cfg.get("kd_chunk_size", 1024)), str(cfg.dms.get("decision", "adapter")),
            2 if cfg.dtype == "bf16" else 4,
        )  # fmt: skip
    return {
        "shape": shape,
        "prior_per_token_bytes": prior.per_token_bytes if prior else None,
        "hf_repo": cfg.get("hf_repo", None),
        "random_init": bool(cfg.get("random_init", False)),
        "random_init_config": OmegaConf.to_container(cfg.random_init_config)
        if cfg.get("random_init_config", None) is not None
        else None,
        "synthetic_data": OmegaConf.to_container(synthetic) if isinstance(synthetic, DictConfig) else synthetic,
        "variant": variant,
        "decision": cfg.dms.get("decision", None),
        "seq_len": int(cfg.max_seq_len),
        "batch_size": int(cfg.batch_size),
        "gradient_accumulation_steps": int(cfg.gradient_accumulation_steps),
        "max_steps": int(cfg.max_steps),
        "zeroing_steps": int(cfg.get("zeroing_steps", 0) or 0) if cfg.dms.get("decision") == "borrowed" else 0,
        "warmup_steps": int(cfg.get("benchmark_warmup_steps", 1 if cfg.get("benchmark", False) else 0) or 0),
        "activation_checkpointing": bool(cfg.get("enable_activation_checkpointing", False)),
        "compile": bool(cfg.get("compile", False)),
        "dtype": str(cfg.dtype),
        "kd_chunk_size": int(cfg.get("kd_chunk_size", 1024)),
        "kv_int8": bool((cfg.get("quant", None) or {}).get("kv_int8", False)),
        "fsdp_reshard_after_forward": bool(cfg.get("fsdp_reshard_after_forward", True)),
    }
