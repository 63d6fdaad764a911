"""LoRA on the frozen base of an adapter-variant retrofit: settings, torchtune modules, names, merging.

The retrofit (`tune run dms_retrofit ... lora.enabled=true`, README "Retrofit") wraps the chosen linear
layers of the frozen base in torchtune's own `LoRALinear` (`torchtune.modules.peft`): the base weight
stays the same tensor, `lora_a` / `lora_b` are the trained low-rank factors, and `disable_adapter`
gives the teacher the base without them. Outside training the factors are never run as such: every
loader (`load_hf_checkpoint`, hence `load_dms_model`, `python -m dms_flex.generate` and
`python -m dms_flex.eval`; and `dms_flex.hf.from_pretrained`) merges them into the base weights on load,
`W + (alpha / rank) * B @ A` in fp32 with torchtune's `get_merged_lora_ckpt`, on the Hugging Face layout,
so both integrations compute the same merged weights bit for bit when the model is loaded in the
checkpoint's stored dtype (the Hugging Face path merges into weights already cast to the requested
dtype, so an fp32 checkpoint loaded in bf16 may differ in the last bit).

Stored form (checkpoint folders and adapter folders alike): the factors under Hugging Face module names
in PEFT's spelling, `model.layers.{i}.self_attn.q_proj.lora_A.weight` (rank, in) and `...lora_B.weight`
(out, rank), fp32, `lora_B` rows in the Hugging Face q/k layout (`keys`: Llama permutes q/k rows between
the two trees; a row permutation commutes with `B @ A`); config.json / dms_config.json carry
`dms_lora_rank`, `dms_lora_alpha` and `dms_lora_modules` (torchtune module names).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "LORA_WEIGHTS_NAME",
    "LORA_MODULES",
    "LoRASettings",
    "LoRADelta",
    "is_lora_key",
    "apply_lora",
    "lora_to_hf",
    "lora_to_tune",
    "merge_lora",
]

LORA_WEIGHTS_NAME = "dms_lora.safetensors"  # the LoRA factors of an adapter folder
# torchtune module name -> Hugging Face module name, per layer
LORA_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "output_proj": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}
_TUNE_PARENT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "output_proj": "attn"}
_TUNE_RE = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([ab])\.weight$")
_HF_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_HF_TO_TUNE_MODULE = {hf.split(".")[1]: tune for tune, hf in LORA_MODULES.items()}


class LoRAError(ValueError):
    """LoRA settings or tensors that do not fit; the message says which and why."""


def is_lora_key(name: str) -> bool:
    """A LoRA factor, torchtune (`.lora_a.`) or Hugging Face (`.lora_A.`) spelling."""
    return ".lora_a." in name or ".lora_b." in name or ".lora_A." in name or ".lora_B." in name


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "output_proj")
    dropout: float = 0.0  # training only

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise LoRAError(f"lora.rank={self.rank!r} is invalid: it must be an integer >= 1")
        if not (
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and math.isfinite(self.alpha)
        ):
            raise LoRAError(f"lora.alpha={self.alpha!r} is invalid: it must be a finite number")
        if self.alpha <= 0:
            raise LoRAError(f"lora.alpha={self.alpha!r} is invalid: it must be > 0")
        unknown = [m for m in self.modules if m not in LORA_MODULES]
        if unknown or not self.modules or len(set(self.modules)) != len(self.modules):
            raise LoRAError(
                f"lora.modules={list(self.modules)!r} is invalid: a non-empty list without repeats of "
                f"{list(LORA_MODULES)} (attention: q_proj k_proj v_proj output_proj; MLP: w1 w2 w3)"
            )
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise LoRAError(f"lora.dropout={self.dropout!r} is invalid: it must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_hf(self) -> Dict[str, Any]:
        return {"dms_lora_rank": self.rank, "dms_lora_alpha": float(self.alpha), "dms_lora_modules": list(self.modules)}

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> Optional["LoRASettings"]:
        """The LoRA of a checkpoint's config.json / an adapter's dms_config.json (None: no LoRA)."""
        if "dms_lora_rank" not in cfg:
            return None
        try:
            return cls(rank=cfg["dms_lora_rank"], alpha=cfg["dms_lora_alpha"], modules=tuple(cfg["dms_lora_modules"]))
        except (KeyError, TypeError, LoRAError) as e:
            raise LoRAError(f"{source}: bad LoRA keys (dms_lora_rank, dms_lora_alpha, dms_lora_modules): {e}") from None


class LoRADelta(NamedTuple):
    """A checkpoint's or adapter folder's LoRA: its settings and factors (Hugging Face names)."""

    settings: LoRASettings
    tensors: Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------- training
def apply_lora(model: nn.Module, settings: LoRASettings, seed: int = 0) -> nn.Module:
    """Wrap the chosen linear layers of a torchtune decoder in torchtune's LoRALinear, in place. The base
    weight (and bias) stay the same tensors under the same state-dict names; lora_b starts at zero (the
    model is unchanged), lora_a from torchtune's init under `seed` (the same on every rank and resume)."""
    from torchtune.modules.peft import LoRALinear

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in model.layers:
            for name in settings.modules:
                parent = layer.attn if _TUNE_PARENT.get(name) == "attn" else layer.mlp
                old = getattr(parent, name)
                if isinstance(old, LoRALinear):
                    raise LoRAError(f"{name} already has LoRA")
                if type(old) is not nn.Linear:
                    raise LoRAError(f"LoRA wraps plain nn.Linear layers; {name} is a {type(old).__name__}")
                device = old.weight.device
                with torch.device("meta"):  # the base weight is the existing one: allocate only the factors
                    new = LoRALinear(
                        old.in_features,
                        old.out_features,
                        rank=settings.rank,
                        alpha=settings.alpha,
                        dropout=settings.dropout,
                        use_bias=old.bias is not None,
                    )
                if device.type != "meta":
                    new.lora_a.to_empty(device="cpu").float()
                    new.lora_b.to_empty(device="cpu").float()
                    new.initialize_parameters()  # on CPU: the same values whatever the device
                    new.lora_a.to(device)
                    new.lora_b.to(device)
                new.weight, new.bias = old.weight, old.bias
                setattr(parent, name, new)
    return model


# ---------------------------------------------------------------------------------------- names
def _row_permutation(n_rows: int, n_heads: int, to_hf: bool) -> torch.Tensor:
    """The row order torchtune's Llama key converters give q/k weights (`keys`), as an index: applying it
    to the rows of any (out, k) matrix converts it like the weight."""
    head_dim = n_rows // n_heads
    idx = torch.arange(n_rows)
    if to_hf:
        return idx.view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    return idx.view(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _permuted(t: torch.Tensor, module: str, cfg: Mapping[str, Any], family: str, to_hf: bool) -> torch.Tensor:
    if family != "llama" or module not in ("q_proj", "k_proj"):
        return t  # torchtune's Qwen2 uses the rotate-half layout itself; other modules are not permuted
    from .hf_config import dims

    d = dims(dict(cfg))
    heads = d["num_heads"] if module == "q_proj" else d["num_kv_heads"]
    return t[_row_permutation(t.shape[0], heads, to_hf)]


def lora_to_hf(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], family: str) -> Dict[str, torch.Tensor]:
    """torchtune-named factors (`layers.0.attn.q_proj.lora_b.weight`) -> Hugging Face names and layout."""
    out = {}
    for name, t in sd.items():
        m = _TUNE_RE.match(name)
        if m is None or m.group(3) not in LORA_MODULES:
            raise LoRAError(f"{name} is not a LoRA factor of a decoder layer")
        layer, _, module, ab = m.groups()
        if ab == "b":
            t = _permuted(t, module, cfg, family, to_hf=True)
        out[f"model.layers.{layer}.{LORA_MODULES[module]}.lora_{ab.upper()}.weight"] = t
    return out


def lora_to_tune(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], family: str) -> Dict[str, torch.Tensor]:
    """The inverse of lora_to_hf."""
    out = {}
    for name, t in sd.items():
        m = _HF_RE.match(name)
        if m is None or m.group(3) not in _HF_TO_TUNE_MODULE:
            raise LoRAError(f"{name} is not a LoRA factor of a decoder layer (model.layers.N.<module>.lora_A/B.weight)")
        layer, _, hf_module, ab = m.groups()
        module = _HF_TO_TUNE_MODULE[hf_module]
        if ab == "B":
            t = _permuted(t, module, cfg, family, to_hf=False)
        parent = _TUNE_PARENT.get(module, "mlp")
        out[f"layers.{layer}.{parent}.{module}.lora_{ab.lower()}.weight"] = t
    return out


def expected_lora_shapes(settings: LoRASettings, base_shapes: Mapping[str, Any]) -> Dict[str, Tuple[int, int]]:
    """Hugging Face names and shapes of the factors `settings` gives a base of `base_shapes` (HF names)."""
    out = {}
    for name, shape in base_shapes.items():
        m = re.match(r"^(model\.layers\.\d+\.(\w+\.\w+))\.weight$", name)
        if m and m.group(2) in [LORA_MODULES[x] for x in settings.modules]:
            rows, cols = tuple(shape)
            out[f"{m.group(1)}.lora_A.weight"] = (settings.rank, cols)
            out[f"{m.group(1)}.lora_B.weight"] = (rows, settings.rank)
    return out


def check_lora(delta: LoRADelta, base_shapes: Mapping[str, Any], source: str) -> None:
    """LoRAError unless `delta` holds exactly the factors its settings give this base, shapes included."""
    expected = expected_lora_shapes(delta.settings, base_shapes)
    got = {k: tuple(v.shape) for k, v in delta.tensors.items()}
    if got != expected:
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise LoRAError(
            f"the LoRA factors in {source} do not fit the model (rank {delta.settings.rank}, modules "
            f"{list(delta.settings.modules)}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, got[k], expected[k]) for k in wrong[:2]]}; apply it to the base it was trained on"
        )


# ---------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_lora(base: Dict[str, torch.Tensor], delta: LoRADelta) -> Dict[str, torch.Tensor]:
    """Merge the factors into Hugging Face-named base weights (in place; returns `base`): each weight
    becomes `W + (alpha / rank) * B @ A` in fp32 (torchtune's get_merged_lora_ckpt), dtype fp32."""
    from torchtune.modules.peft import get_merged_lora_ckpt

    for a_name in sorted(k for k in delta.tensors if k.endswith(".lora_A.weight")):
        module = a_name[: -len(".lora_A.weight")]
        one = {
            "m.weight": base[f"{module}.weight"].float(),
            "m.lora_a.weight": delta.tensors[a_name].float(),
            "m.lora_b.weight": delta.tensors[f"{module}.lora_B.weight"].float(),
        }
        base[f"{module}.weight"] = get_merged_lora_ckpt(one, rank=delta.settings.rank, alpha=delta.settings.alpha)[
            "m.weight"
        ]
    return base
