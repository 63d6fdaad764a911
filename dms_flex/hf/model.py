"""DMS on a transformers Llama / Qwen2 / Qwen3 model: `enable_dms`, the runtime switches, the hooks and
the patched attention-module forward.

transformers' attention functions receive q and k AFTER RoPE, while the borrowed-neuron decision must
read q BEFORE RoPE (after Qwen3's q_norm) and zero that channel before and after RoPE, so
`enable_dms` replaces each attention module's `forward` (an instance attribute bound to
`_dms_self_attention_forward`; class, submodules and state-dict names are untouched). It runs the
module's own projections, q/k norms and the modeling file's own `apply_rotary_pos_emb`, takes the
decision logits from `dms_flex.decisions` in between, and calls the "dms" attention function
(`dms_flex.hf.attention`).

Hooks (`register_forward_pre_hook(with_kwargs=True)`): one on each decoder layer passes the layer's
input residual x to its attention module as the keyword `dms_residual` (the adapter variant reads it:
l = Linear(RMSNorm(x))), and
one on the inner model (`model.model`) swaps the empty `DynamicCache` that `generate()` creates for a
`DMSCache` and sets `position_ids` from the cache (live tokens per row), so RoPE positions and the
cache's positions agree by construction, left padding and multi-turn included.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from .. import decisions
from ..config import DMSConfig, DMSConfigError
from .attention import ATTN_IMPLEMENTATION, register_with_transformers
from .cache import DMSCache

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "enable_dms",
    "dms_config_of",
    "dms_config_from_hf",
    "set_eviction",
    "eviction_disabled",
    "capture_decisions",
]

#: transformers classes DMS can be enabled on.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# LlamaModel / Qwen2Model / Qwen3Model.forward parameters, in order (to name positional arguments).
# ("cache" is named past_key_values in earlier 5.x releases such as 5.17: same position)
_MODEL_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache")


@dataclass
class _Runtime:
    """DMS state shared by a model's attention modules (one object per model)."""

    config: DMSConfig
    eviction: bool = True
    # capture_decisions(): layer index -> raw decision logits (B, Hkv, n) of the last forward
    captured: Optional[Dict[int, torch.Tensor]] = None


# ==================================================================================== set-up
def enable_dms(model: nn.Module, config: Optional[DMSConfig] = None, *, eviction: bool = True) -> nn.Module:
    """Make a transformers Llama / Qwen2 / Qwen3 causal LM a DMS model, in place; returns it.

    config: the DMS settings; default: read from the model config's `dms_*` keys (DMSConfigError if
    there are none). The settings are written back into `model.config` (so `save_pretrained` keeps
    them). The adapter variant adds a zero-initialised float32 `dms_adapter` (RMSNorm + Linear(hidden
    -> num_kv_heads)) to every attention module; the borrowed-neuron variant adds no parameters.
    Calling it again replaces the settings (adapters are added or removed to match).
    eviction=False runs the unmodified model (see `set_eviction`).
    """
    _check_supported(model)
    if config is None:
        config = dms_config_from_hf(model.config.to_dict(), source="the model's config")
    if not isinstance(config, DMSConfig):
        raise TypeError(f"config must be a dms_flex.DMSConfig, got {type(config).__name__}")
    register_with_transformers()
    inner = model.model
    runtime = getattr(model, "_dms_runtime", None)
    if runtime is None:
        runtime = _Runtime(config=config, eviction=eviction)
        model._dms_runtime = runtime
        inner._dms_runtime = runtime
        inner.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
        for layer in inner.layers:
            layer.register_forward_pre_hook(_stash_layer_input, with_kwargs=True)
            layer.self_attn._dms_runtime = runtime
            # bound to this instance only: deepcopy rebinds it to the copy
            layer.self_attn.forward = _dms_self_attention_forward.__get__(layer.self_attn)
        model.generate = _dms_generate.__get__(model)
    runtime.config, runtime.eviction = config, eviction
    hidden = model.config.hidden_size
    for layer in inner.layers:
        attn = layer.self_attn
        decisions.sync_adapter(attn, config, hidden, _num_kv_heads(attn), attn.q_proj.weight.device)
    for key, value in config.to_hf().items():
        setattr(model.config, key, value)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.dms_config = config
    return model


def dms_config_of(model: nn.Module) -> DMSConfig:
    runtime = getattr(model, "_dms_runtime", None)
    if runtime is None:
        raise ValueError(
            "this model has no DMS: call dms_flex.hf.enable_dms(model, DMSConfig(...)) or load it "
            "with dms_flex.hf.from_pretrained(folder)"
        )
    return runtime.config


def set_eviction(model: nn.Module, enabled: bool) -> None:
    """enabled=False: the unmodified model (no decisions, borrowed channel not zeroed, nothing
    evicted; the DMS cache then holds every token) -- DMS's teacher. True restores DMS."""
    _runtime_of(model).eviction = bool(enabled)


@contextlib.contextmanager
def eviction_disabled(model: nn.Module) -> Iterator[nn.Module]:
    runtime = _runtime_of(model)
    old = runtime.eviction
    runtime.eviction = False
    try:
        yield model
    finally:
        runtime.eviction = old


@contextlib.contextmanager
def capture_decisions(model: nn.Module) -> Iterator[Dict[int, torch.Tensor]]:
    """Inside the block, the returned dict maps layer index -> raw decision logits (B, Hkv, n) of the
    latest forward (before the next-token shift; `> 0` marks the previous token)."""
    runtime = _runtime_of(model)
    runtime.captured = {}
    try:
        yield runtime.captured
    finally:
        runtime.captured = None


def _runtime_of(model: nn.Module) -> _Runtime:
    runtime = getattr(model, "_dms_runtime", None)
    if runtime is None:
        dms_config_of(model)  # raises the explanatory error
    return runtime


def _num_kv_heads(attn: nn.Module) -> int:
    return attn.config.num_key_value_heads or attn.config.num_attention_heads


def _check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if not any(c.__name__ in SUPPORTED_ARCHITECTURES for c in type(model).__mro__):
        raise ValueError(
            f"DMS is not supported for {name}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        raise ValueError(
            f"{name} with sliding-window layers ({sorted(set(layer_types))}) is not supported: DMS "
            f"needs full-attention layers"
        )
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    for i, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ValueError(
                f"layer {i} of {name} has no standard self_attn module; supported architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )


def dms_config_from_hf(hf_config: Dict[str, Any], source: str = "config.json") -> DMSConfig:
    """DMSConfig.from_hf with errors that name the config.json key."""
    try:
        return DMSConfig.from_hf(hf_config, source=source)
    except DMSConfigError as e:
        if "lacks the DMS keys" not in str(e):
            raise
        raise DMSConfigError(
            f"{e} To enable DMS on a model without DMS settings, pass dms_config=DMSConfig(...) explicitly."
        ) from None


def _dms_generate(self, *args, **kwargs):
    """The model's own generate(), around two DMS rules:
    - `cache_implementation="static"` (as a keyword or in the generation config) asks for a compiled
      static cache: a DMS model gets a fixed-capacity `DMSCache` of prompt + new tokens slots instead
      (transformers then compiles its decode step), unless a cache is passed;
    - a fixed-capacity DMSCache's overflow check after the last step (the per-step check,
      `DMSCache.get_mask_sizes`, runs before each step)."""
    passed = next((kwargs[n] for n in ("cache", "past_key_values") if kwargs.get(n) is not None), None)
    config = kwargs.get("generation_config") or self.generation_config
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    named = []  # generation configs that name the static cache: set aside for the call, restored after it
    if implementation == "static" and passed is None:
        kwargs.pop("cache_implementation", None)
        passed = DMSCache(self, capacity=_static_capacity(config, args, kwargs))
        kwargs[_cache_arg_name(self.model)] = passed
        # (transformers would refuse a cache passed together with them)
        configs = (kwargs.get("generation_config"), self.generation_config)
        named = list({id(c): c for c in configs if c is not None and c.cache_implementation == "static"}.values())
    for c in named:
        c.cache_implementation = None
    try:
        out = type(self).generate(self, *args, **kwargs)
    finally:
        for c in named:
            c.cache_implementation = "static"
    if isinstance(passed, DMSCache):
        passed.check_overflow()
    return out


def _static_capacity(config, args, kwargs) -> int:
    """Slots per row of the cache that `cache_implementation="static"` asks for: prompt + max_new_tokens
    (or max_length), as transformers sizes its own static cache (every token, so it never overflows)."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError('cache_implementation="static" on a DMS model needs the input_ids (or inputs_embeds)')
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return int(ids.shape[1]) + int(new)
    return max(int(kwargs.get("max_length", getattr(config, "max_length", None) or 0)), int(ids.shape[1]) + 1)


# ==================================================================================== hooks
def _stash_layer_input(layer: nn.Module, args, kwargs):
    """Decoder-layer pre-hook: hand the layer's input residual x to its attention module, for the
    adapter's decision logits. The decoder layers of Llama / Qwen2 / Qwen3 pass their extra keyword
    arguments on to self_attn, so x travels as the keyword `dms_residual`: no state is stored on a
    module (torch.compile would break its graph there, per layer)."""
    x = args[0] if args else kwargs.get("hidden_states")
    return args, {**kwargs, "dms_residual": x}


def _model_pre_hook(module: nn.Module, args, kwargs):
    """Inner-model pre-hook: use a DMSCache, and RoPE positions that agree with it."""
    if args:
        if len(args) > len(_MODEL_FORWARD_ARGS):
            raise TypeError("pass the model's arguments by keyword")
        for name, value in zip(_MODEL_FORWARD_ARGS, args):
            kwargs[name] = value
        args = ()
    cache_arg = _cache_arg_name(module)
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        kwargs[cache_arg] = cache
        return args, kwargs
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = module.config.use_cache and not (module.training and module.gradient_checkpointing)
    if cache is None:
        # a plain forward with gradients: the differentiable full-sequence path, no cache returned
        if use_cache and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            use_cache = False
            kwargs["use_cache"] = False
        if use_cache:
            cache = DMSCache(module)
    elif not isinstance(cache, DMSCache):
        from transformers.cache_utils import DynamicCache

        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            cache = DMSCache(module)  # the fresh DynamicCache generate() makes by default
        elif type(cache) is DynamicCache:
            raise TypeError("a DMS model needs a dms_flex.hf.DMSCache, got a DynamicCache that already holds tokens")
        else:
            raise TypeError(
                f"a DMS model keeps its KV in a dms_flex.hf.DMSCache, not a {type(cache).__name__} (leave "
                f"generate()'s cache_implementation unset, or pass cache=dms_flex.hf.DMSCache(model))"
            )
    B, n = ref.shape[:2]
    if cache is None:
        # the borrowed channel is zeroed after RoPE, which makes attention depend on absolute positions:
        # count them per row from the padding mask (as generate() does), so a row's result does not
        # depend on the left padding around it
        mask = kwargs.get("attention_mask")
        if (
            kwargs.get("position_ids") is None
            and isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[1] == n
        ):
            kwargs["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0)
        return args, kwargs
    kwargs[cache_arg] = cache
    live = _new_token_mask(kwargs.get("attention_mask"), n)
    kwargs["position_ids"] = cache.positions_for(B, n, live, device=ref.device)
    return args, kwargs


def _cache_arg_name(module: nn.Module) -> str:
    """The model's name for its cache argument: `cache` (transformers 5.24), `past_key_values` (5.17)."""
    name = module.__dict__.get("_dms_cache_arg")
    if name is None:
        params = inspect.signature(type(module).forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        module.__dict__["_dms_cache_arg"] = name
    return name


def _new_token_mask(attention_mask, n: int) -> Optional[torch.Tensor]:
    """(B, n) bool: which of the n new tokens are real (the 2-D mask's last n columns). For a compileable
    cache generate() prepares the masks before the forward, per layer type for models that name their
    layer types (Qwen3: {"full_attention": ...}): each is then what `dms_padding_mask` returned (the new
    tokens' (B, n) mask, or None when all are real)."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention")
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    if attention_mask.shape[1] < n:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns but {n} new tokens were given")
    return attention_mask[:, attention_mask.shape[1] - n :].bool()


# ==================================================================================== attention module
def _dms_self_attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings=None,
    attention_mask: Optional[torch.Tensor] = None,
    cache=None,
    dms_residual: Optional[torch.Tensor] = None,
    **kwargs,
):
    """Replaces the forward of a Llama / Qwen2 / Qwen3 attention module (same inputs and outputs).
    dms_residual: the decoder layer's input x (passed by the layer's pre-hook)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    else:
        kwargs.pop("past_key_values", None)
    runtime: _Runtime = self._dms_runtime
    cfg = runtime.config if runtime.eviction else None
    x = dms_residual
    B, n, _ = hidden_states.shape
    shape = (B, n, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head norms before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cfg is not None and cfg.decision == "adapter" and x is None:
        raise RuntimeError(
            "the DMS adapter needs the decoder layer's input, which its pre-hook passes on; "
            "call the decoder layer, not its self_attn module, or use decision='borrowed'"
        )
    cos, sin = position_embeddings
    apply_rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k, logits = decisions.decide_and_rope(
        q, k, cfg, lambda q, k: apply_rope(q, k, cos, sin), k.shape[1], adapter=getattr(self, "dms_adapter", None), x=x
    )
    if logits is not None and runtime.captured is not None:
        runtime.captured[self.layer_idx] = logits.detach()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, weights = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION](
        self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, dms_logits=logits, dms_cache=cache, **kwargs
    )
    out = out.reshape(B, n, -1).contiguous()
    return self.o_proj(out), weights
