"""DMS for Hugging Face transformers (>= 5.17): Llama, Qwen2 and Qwen3 causal LMs, `generate()` included.

Three lines of user code::

    import dms_flex.hf
    model = dms_flex.hf.from_pretrained("path/to/Qwen3-DMS-folder")        # DMS settings from config.json
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)  # greedy, sampling, beams

How DMS is wired into a transformers model (`enable_dms`)
--------------------------------------------------------
transformers' attention functions (the `AttentionInterface`) receive q and k AFTER RoPE, while the
borrowed-neuron decision must read q BEFORE RoPE (after Qwen3's q_norm) and zero that channel before
and after RoPE. An attention function alone therefore cannot implement DMS. The mechanism, smallest
first:

1. each attention module's `forward` is replaced (an instance attribute bound to
   `_dms_self_attention_forward`; class, submodules and state-dict names are untouched). It runs the
   module's own projections, q/k norms and the modeling file's own `apply_rotary_pos_emb`, and in
   between takes the decision logits from `dms_flex.decisions` (borrowed neuron or adapter);
2. the attention itself goes through transformers' extension point: `AttentionInterface.register(
   "dms", dms_attention_forward)` and the model's attention implementation is set to "dms". That
   function is where the eviction rule lives, and it only calls `dms_flex.masks` (full-sequence
   path), `dms_flex.cache.DMSKVCache.append` (prefill, later turns) and `DMSKVCache.decode_update` +
   the decode attention of `dms_flex.cache` (one token per step);
3. `AttentionMaskInterface.register("dms", ...)`: transformers then hands the attention function the
   (batch, new tokens) padding mask instead of a 4-D causal mask (DMS builds its own visibility);
4. `DMSCache`, a `transformers.Cache` whose layers each own one `DMSKVCache`;
5. hooks (`register_forward_pre_hook(with_kwargs=True)`): one on each decoder layer stashes the
   layer's input residual x on its attention module (the adapter variant reads it:
   l = Linear(RMSNorm(x))), and one on the inner model (`model.model`) swaps the empty
   `DynamicCache` that `generate()` creates for a `DMSCache` and sets `position_ids` from the cache
   (live tokens per row), so RoPE positions and the cache's positions agree by construction, left
   padding and multi-turn included.

Left padding: pad columns (attention mask 0) are never live. The new tokens of each row are packed
to the front before `DMSKVCache.append` (which expects right padding) and the outputs unpacked, so
padding may sit anywhere in a new chunk (left padding of a prompt, a padded later turn). Positions
are per row (live tokens before it), as `generate()` computes them from the attention mask.

Without a cache (`use_cache=False`, or a forward with gradients enabled and no cache passed) the
full-sequence path runs: exact attention with the DMS hard mask of `dms_flex.masks` (the
teacher-forced reference). Decisions are always the hard inference rule (`l > 0` evicts); training
with the relaxed decisions is done on the torchtune path (`dms_flex.torchtune_model.forward_train`).

Checkpoint format: `config.json` carries `dms_alpha_scale`, `dms_initial_alpha_offset`,
`dms_window_size`, `dms_cr` (the released `nvidia/Qwen3-8B-DMS-8x` keys) plus this project's
`dms_decision` etc. (`DMSConfig.to_hf` / `from_hf`). Adapter weights are stored as
`model.layers.{i}.self_attn.dms_adapter.norm.weight` / `.linear.weight`, the names
`dms_flex.checkpoint` maps to torchtune's `layers.{i}.attn.dms_adapter.*`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention as dms_attn
from . import decisions, masks, stats
from .checkpoints import hf_folder as checkpoint
from .cache import DMSKVCache, default_decode_attention
from .kernels.reference import masked_attention
from .config import DMSConfig, DMSConfigError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ATTN_IMPLEMENTATION",
    "from_pretrained",
    "save_pretrained",
    "enable_dms",
    "dms_config_of",
    "set_eviction",
    "eviction_disabled",
    "capture_decisions",
    "DMSCache",
    "DMSCacheLayer",
    "dms_attention_forward",
]

#: transformers classes DMS can be enabled on.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: the name DMS attention is registered under in transformers' AttentionInterface / AttentionMaskInterface.
ATTN_IMPLEMENTATION = "dms"

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
    _register_with_transformers()
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
        raise ValueError("this model has no DMS: call dms_flex.hf.enable_dms(model, DMSConfig(...)) or load it "
                         "with dms_flex.hf.from_pretrained(folder)")
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
        raise ValueError(f"DMS is not supported for {name}; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"{name} with sliding-window layers ({sorted(set(layer_types))}) is not supported: DMS "
                         f"needs full-attention layers")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    for i, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ValueError(f"layer {i} of {name} has no standard self_attn module; supported architectures: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def dms_config_from_hf(hf_config: Dict[str, Any], source: str = "config.json") -> DMSConfig:
    """DMSConfig.from_hf with errors that name the config.json key."""
    try:
        return DMSConfig.from_hf(hf_config, source=source)
    except DMSConfigError as e:
        if "lacks the DMS keys" not in str(e):
            raise
        raise DMSConfigError(f"{e} To enable DMS on a model without DMS settings, pass "
                             f"dms_config=DMSConfig(...) explicitly.") from None


# ==================================================================================== load / save
def from_pretrained(folder, dms_config: Optional[DMSConfig] = None, **kwargs) -> nn.Module:
    """Load a local Hugging Face folder (Llama / Qwen2 / Qwen3) as a transformers model with DMS on.

    DMS settings come from config.json's `dms_*` keys (the released format); `dms_config` overrides
    them and is required when the folder has none. Adapter weights (`*.dms_adapter.*`) are loaded
    from the folder's safetensors. Other keyword arguments go to transformers' `from_pretrained`
    (dtype, device_map, ...). Returns the model in eval mode.
    """
    import transformers

    folder = Path(folder).expanduser()
    raw = checkpoint.read_hf_config(folder)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(archs) if archs else f"none (model_type={raw.get('model_type')!r})"
        raise ValueError(f"unsupported architecture in {folder / 'config.json'}: {found}; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    cfg = dms_config if dms_config is not None else dms_config_from_hf(raw, source=str(folder / "config.json"))
    cls = getattr(transformers, arch)
    extra = _read_extra_tensors(folder)
    # the adapter tensors are loaded below, once the adapters exist: keep transformers' load report quiet
    # about them (the pattern is copied into the instance by post_init; the class is restored at once)
    had_own = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    cls._keys_to_ignore_on_load_unexpected = set(old or ()) | {r"\.dms_adapter\."}
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    finally:
        if had_own:
            cls._keys_to_ignore_on_load_unexpected = old
        else:
            del cls._keys_to_ignore_on_load_unexpected
    enable_dms(model, cfg)
    checkpoint.load_extra_state(model, extra, str(folder), dms_config_of(model).decision)
    return model.eval()


def save_pretrained(model: nn.Module, folder, **kwargs) -> None:
    """`model.save_pretrained(folder)` with the DMS keys written into config.json (adapter weights
    are ordinary parameters and are saved with the model)."""
    cfg = dms_config_of(model)
    for key, value in cfg.to_hf().items():
        setattr(model.config, key, value)
    model.save_pretrained(str(folder), **kwargs)
    for weights in Path(folder).glob("*.safetensors"):  # safetensors writes 0600: readable like config.json
        checkpoint.make_readable(weights)


def _weight_files(folder: Path) -> List[Path]:
    if (folder / checkpoint.WEIGHTS_INDEX_NAME).is_file():
        return checkpoint._weight_files(folder)  # a damaged index or missing shards: a ValueError that says so
    return sorted(folder.glob("*.safetensors"))


def _read_extra_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """The tensors whose name contains 'dms' (DMS parameters), without reading the base weights."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with checkpoint.safetensors_errors(path), safe_open(str(path), "pt") as f:
            for name in f.keys():
                if checkpoint.is_extra_key(name):
                    out[name] = f.get_tensor(name)
    return out


# ==================================================================================== hooks
def _stash_layer_input(layer: nn.Module, args, kwargs):
    """Decoder-layer pre-hook: the layer's input residual x, for the adapter's decision logits."""
    x = args[0] if args else kwargs.get("hidden_states")
    layer.self_attn.__dict__["_dms_residual"] = x
    return None


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
            raise TypeError(f"a DMS model keeps its KV in a dms_flex.hf.DMSCache, not a {type(cache).__name__} (leave "
                            f"generate()'s cache_implementation unset, or pass cache=dms_flex.hf.DMSCache(model))")
    B, n = ref.shape[:2]
    if cache is None:
        # the borrowed channel is zeroed after RoPE, which makes attention depend on absolute positions:
        # count them per row from the padding mask (as generate() does), so a row's result does not
        # depend on the left padding around it
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
                and mask.shape[1] == n:
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


def _new_token_mask(attention_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """(B, n) bool: which of the n new tokens are real (the 2-D mask's last n columns)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    if attention_mask.shape[1] < n:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns but {n} new tokens were given")
    return attention_mask[:, attention_mask.shape[1] - n:].bool()


# ==================================================================================== attention module
def _dms_self_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                                attention_mask: Optional[torch.Tensor] = None, cache=None, **kwargs):
    """Replaces the forward of a Llama / Qwen2 / Qwen3 attention module (same inputs and outputs)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    else:
        kwargs.pop("past_key_values", None)
    runtime: _Runtime = self._dms_runtime
    cfg = runtime.config if runtime.eviction else None
    x = self.__dict__.pop("_dms_residual", None)
    B, n, _ = hidden_states.shape
    shape = (B, n, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head norms before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cfg is not None and cfg.decision == "adapter" and x is None:
        raise RuntimeError("the DMS adapter needs the decoder layer's input, which its pre-hook stashes; "
                           "call the decoder layer, not its self_attn module, or use decision='borrowed'")
    cos, sin = position_embeddings
    apply_rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k, logits = decisions.decide_and_rope(q, k, cfg, lambda q, k: apply_rope(q, k, cos, sin), k.shape[1],
                                             adapter=getattr(self, "dms_adapter", None), x=x)
    if logits is not None and runtime.captured is not None:
        runtime.captured[self.layer_idx] = logits.detach()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, weights = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION](
        self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, dms_logits=logits, dms_cache=cache,
        **kwargs)
    out = out.reshape(B, n, -1).contiguous()
    return self.o_proj(out), weights


def dms_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                          dropout: float = 0.0, dms_logits: Optional[torch.Tensor] = None, dms_cache=None,
                          position_ids: Optional[torch.Tensor] = None, **kwargs):
    """The "dms" entry of transformers' AttentionInterface.

    query (B, Hq, n, D) and key/value (B, Hkv, n, D) after RoPE; attention_mask: (B, n) bool, the
    real tokens among the n new ones (from the "dms" mask function), or None (all real);
    dms_logits (B, Hkv, n) raw decision logits (None: eviction off). Returns ((B, n, Hq, D), None).
    """
    runtime = getattr(module, "_dms_runtime", None)
    if runtime is None:
        raise RuntimeError('attn_implementation="dms" needs the DMS attention modules: load the model with '
                           "dms_flex.hf.from_pretrained or call dms_flex.hf.enable_dms(model) first")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError("DMS attention takes a 2-D (batch, tokens) padding mask; it got a prepared "
                         f"{getattr(attention_mask, 'shape', type(attention_mask))} mask. Keep the model's "
                         f'attn_implementation "dms" and pass 2-D attention masks.')
    window = runtime.config.effective_window
    live = attention_mask
    if dms_cache is None:
        out = _full_sequence_attention(query, key, value, dms_logits, live, position_ids, window, scaling)
    else:
        if not isinstance(dms_cache, DMSCache):
            raise TypeError(f"a DMS model needs a dms_flex.hf.DMSCache, got {type(dms_cache).__name__}")
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            raise RuntimeError("the DMS cache is an inference cache: run under torch.no_grad() (generate does), or "
                               "pass use_cache=False for the differentiable full-sequence path")
        layer = dms_cache.layers[module.layer_idx]
        if layer.window != window:
            raise ValueError(f"this DMSCache was made for window {layer.window}, the model's DMS window is {window}")
        n = query.shape[2]
        if n == 1 and live is None and layer.kv is not None:
            out = layer.decode(query, key, value, dms_logits, scaling)
        else:
            out = layer.append(query, key, value, dms_logits, live, scaling)
    return out.transpose(1, 2).contiguous(), None


def dms_padding_mask(*, batch_size=None, q_length=None, attention_mask=None, **kwargs):
    """The "dms" entry of transformers' AttentionMaskInterface: (B, q_length) bool real-token mask of
    the new tokens, or None when all are real (one host sync per forward, as HF's own masks do)."""
    if attention_mask is None:
        return None
    live = attention_mask[:, attention_mask.shape[-1] - q_length:].bool()
    if bool(live.all()):
        return None
    return live


def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, dms_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dms_padding_mask)


# ==================================================================================== full sequence
def decided_logits(logits: torch.Tensor, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next-token shift with padding: token t is decided by the next REAL token's logit (the last
    real token of a row is never evicted). logits (B, H, T), live (B, T) bool or None."""
    if live is None:
        return decisions.shift_to_decided_token(logits)
    B, H, T = logits.shape
    order = _pack_order(live)
    packed = logits.gather(2, order[:, None, :].expand(B, H, T))
    live_packed = live.gather(1, order)
    dec = decisions.shift_to_decided_token(packed)
    next_live = torch.cat([live_packed[:, 1:], torch.zeros_like(live_packed[:, :1])], dim=1)
    dec = dec.masked_fill(~next_live[:, None, :], decisions.KEEP_LOGIT)
    return dec.gather(2, torch.argsort(order, dim=1)[:, None, :].expand(B, H, T))


def _full_sequence_attention(q, k, v, logits, live, position_ids, window, scale):
    """Exact attention under the DMS hard rule over a whole sequence (no cache)."""
    B, H, T, _ = k.shape
    dev = k.device
    if logits is None:
        evicted = torch.zeros(B, H, T, dtype=torch.bool, device=dev)
    else:
        evicted = decisions.hard_evict(decided_logits(logits, live))
    idx = torch.arange(T, device=dev)
    pos = idx[None].expand(B, T) if position_ids is None else position_ids.expand(B, T)
    if live is None and bool((pos == idx).all()):
        log_keep = torch.zeros(B, H, T, device=dev).masked_fill(evicted, float("-inf"))
        return dms_attn.dms_attention(q, k, v, log_keep, window, scale=scale)
    vis = masks.visible(pos[:, None, :, None], pos[:, None, None, :], evicted[:, :, None, :], window)
    vis = vis & (idx[None, :] <= idx[:, None])
    if live is not None:
        vis = vis & live[:, None, None, :]
        vis = vis | (torch.eye(T, dtype=torch.bool, device=dev) & ~live[:, None, :, None])  # pads see themselves
    return masked_attention(q, k, v, vis, scale=scale)


def _pack_order(live: torch.Tensor) -> torch.Tensor:
    """(B, n) permutation putting each row's real tokens first, in order."""
    return torch.sort((~live).to(torch.int8), dim=1, stable=True).indices


# ==================================================================================== the cache
class DMSCacheLayer(CacheLayerMixin):
    """One layer of a DMSCache: a `dms_flex.cache.DMSKVCache` (created at the first forward, grown by
    doubling when the live tokens need more slots) plus each row's next position."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, window: int, initial_capacity: Optional[int] = None):
        super().__init__()
        self.window = window
        self.initial_capacity = initial_capacity
        self.kv: Optional[DMSKVCache] = None
        self.next_pos: Optional[torch.Tensor] = None  # (B,) live tokens seen per row
        self.seen = 0  # columns (tokens, padding included) processed: what generate() slices inputs by
        self._bound = 0  # host-side upper bound of the longest live length (no sync per decode step)

    # --- transformers' CacheLayerMixin protocol
    @property
    def keys(self):
        return None if self.kv is None else self.kv.keys

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("DMSCacheLayer keys are owned by its DMSKVCache")

    @property
    def values(self):
        return None if self.kv is None else self.kv.values

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("DMSCacheLayer values are owned by its DMSKVCache")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        capacity = max(1, self.initial_capacity or 64)
        self.kv = DMSKVCache(B, H, D, capacity, self.window, dtype=key_states.dtype, device=key_states.device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a DMSCache is filled by DMS attention (dms_flex.hf), not by cache.update(): this "
                           "attention module is not DMS-enabled (call dms_flex.hf.enable_dms on the model)")

    def get_mask_sizes(self, query_length: int):
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()
            self.next_pos.zero_()
        self.seen = 0
        self._bound = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError("a DMS cache cannot be cropped: evicted tokens are gone (assisted / speculative "
                                  "decoding and contrastive search are not supported)")

    def offload(self):
        raise NotImplementedError("DMS caches do not support offloading")

    def prefetch(self):
        raise NotImplementedError("DMS caches do not support offloading")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv is not None:
            indices = indices.to(self.kv.k.device)
            self._map_rows(lambda t: t.index_select(0, indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_rows(self, fn) -> None:
        for name, buf in list(self.kv.named_buffers(recurse=False)):
            if buf.dim() > 0:  # every DMSKVCache buffer but the scalar overflow flag is batch-first
                setattr(self.kv, name, fn(buf).contiguous())
        self.next_pos = fn(self.next_pos).contiguous()

    # --- DMS
    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.capacity

    def live_lengths(self) -> torch.Tensor:
        """(B, Hkv) tokens held per row and KV head."""
        return self.kv.length.clone()

    def _ensure(self, k: torch.Tensor) -> None:
        if self.kv is None:
            self.lazy_initialization(k, k)
        if k.shape[0] != self.kv.k.shape[0] or k.shape[1] != self.kv.k.shape[1]:
            raise ValueError(f"this DMSCache holds batch {self.kv.k.shape[0]} x {self.kv.k.shape[1]} KV heads, the "
                             f"input has {k.shape[0]} x {k.shape[1]}: use a new DMSCache for a new batch")

    def _grow(self, needed: int) -> None:
        """Re-allocate with at least `needed` slots (doubling); live slots, ring and marks are kept.
        Relies on DMSKVCache's layout: slot `capacity` is the scratch slot, win_slot == capacity
        means "no slot", slot_pos == -1 marks a dead slot."""
        old = self.kv
        C = old.capacity
        C2 = max(needed, 2 * C)
        C2 = -(-C2 // 64) * 64
        B, H, _, D = old.k.shape
        new = DMSKVCache(B, H, D, C2, self.window, dtype=old.k.dtype, device=old.k.device)
        with torch.no_grad():
            new.k[:, :, :C].copy_(old.k[:, :, :C])
            new.v[:, :, :C].copy_(old.v[:, :, :C])
            new.length.copy_(old.length)
            new.slot_pos[..., :C].copy_(old.slot_pos[..., :C])
            new.slot_marked[..., :C].copy_(old.slot_marked[..., :C])
            new.win_slot.copy_(torch.where(old.win_slot == C, torch.full_like(old.win_slot, C2), old.win_slot))
            new.overflow.copy_(old.overflow)
        self.kv = new

    def append(self, q, k, v, logits, live, scale) -> torch.Tensor:
        """n new tokens (padding anywhere, `live` (B, n) bool or None): exact DMS attention over the
        live cache plus themselves, then survivors are packed. Returns (B, Hq, n, D)."""
        self._ensure(k)
        B, H, n, D = k.shape
        order = None
        if live is None:
            n_valid = torch.full((B,), n, dtype=torch.long, device=k.device)
        else:
            order = _pack_order(live)
            q = q.gather(2, order[:, None, :, None].expand_as(q))
            k = k.gather(2, order[:, None, :, None].expand_as(k))
            v = v.gather(2, order[:, None, :, None].expand_as(v))
            if logits is not None:  # None: eviction off, nothing is ever marked
                logits = logits.gather(2, order[:, None, :].expand_as(logits))
            n_valid = live.sum(1)
        needed = int(self.kv.length.max()) + n
        if needed > self.kv.capacity:
            self._grow(needed)
        out = self.kv.append(q, k, v, logits, self.next_pos, n_valid, scale=scale)
        if order is not None:
            inv = torch.argsort(order, dim=1)
            out = out.gather(2, inv[:, None, :, None].expand_as(out))
        self.next_pos += n_valid
        self.seen += n
        self._bound = int(self.kv.length.max())
        return out

    def decode(self, q, k, v, logits, scale) -> torch.Tensor:
        """One real token per row: `DMSKVCache.decode_update` (slot reuse, no compaction) and attention
        over the live slots. No host sync unless the slots may run out."""
        if self._bound + 1 > self.kv.capacity:
            self._bound = int(self.kv.length.max())
            if self._bound + 1 > self.kv.capacity:
                self._grow(self._bound + 1)
        if logits is None:
            evict_prev = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)
        else:
            evict_prev = decisions.hard_evict(logits[..., 0])
        self.kv.decode_update(k, v, evict_prev, self.next_pos)
        out = default_decode_attention(q.device)(q, self.kv, scale)
        self.next_pos += 1
        self.seen += 1
        self._bound += 1
        return out


class DMSCache(Cache):
    """The DMS KV cache for transformers' `generate()` / forward: one DMSKVCache per layer.

    `DMSCache(model)`; pass it to generate() as `cache=` (transformers 5.24; `past_key_values=` there
    is the deprecated name, and the only one in earlier 5.x releases such as 5.17) and pass it again
    with the extended sequence to continue a conversation.
    generate() creates one by itself when none is passed. initial_capacity: slots per (row, KV head)
    allocated at the first forward (default: enough for the prompt); the cache grows by doubling.
    """

    def __init__(self, model: nn.Module, initial_capacity: Optional[int] = None):
        runtime = getattr(model, "_dms_runtime", None)
        if runtime is None:
            raise ValueError("DMSCache(model) needs a DMS model (dms_flex.hf.enable_dms / from_pretrained)")
        n_layers = model.config.num_hidden_layers
        window = runtime.config.effective_window
        super().__init__(layers=[DMSCacheLayer(window, initial_capacity) for _ in range(n_layers)])

    @property
    def window(self) -> int:
        return self.layers[0].window

    def positions_for(self, batch: int, n: int, live: Optional[torch.Tensor], device) -> torch.Tensor:
        """(B, n) RoPE positions of n new tokens: each row continues from its live-token count."""
        start = self.layers[0].next_pos
        if start is None:
            start = torch.zeros(batch, dtype=torch.long, device=device)
        start = start.to(device)
        if start.shape[0] != batch:
            raise ValueError(f"this DMSCache holds batch {start.shape[0]}, the input has batch {batch}: use a new "
                             f"DMSCache for a new batch")
        if live is None:
            return start[:, None] + torch.arange(n, device=device)[None]
        return start[:, None] + (live.long().cumsum(1) - 1).clamp_min(0)

    def live_lengths(self) -> List[torch.Tensor]:
        """Per layer, (B, Hkv) tokens held."""
        return [layer.live_lengths() for layer in self.layers]

    def tokens_seen(self) -> torch.Tensor:
        """(B,) real tokens seen per row (the cached ones plus the evicted ones)."""
        return self.layers[0].next_pos.clone()

    def compression(self) -> stats.CompressionReport:
        """Kept fraction per layer and KV head, averaged over rows; `.ratio` is the compression ratio."""
        seen = self.tokens_seen().clamp_min(1)[:, None].float()
        return stats.compression_report([layer.kv.length.float() / seen for layer in self.layers])

    def kv_bytes(self) -> dict:
        """Live KV bytes vs a dense cache holding the same tokens, and bytes allocated."""
        kv0 = self.layers[0].kv
        per_slot = 2 * kv0.k.shape[-1] * kv0.k.element_size()
        live = sum(int(layer.kv.length.sum()) for layer in self.layers) * per_slot
        dense = int(self.tokens_seen().sum()) * kv0.k.shape[1] * len(self.layers) * per_slot
        allocated = sum(2 * layer.kv.k.numel() * layer.kv.k.element_size() for layer in self.layers)
        return {"live": live, "dense": dense, "allocated": allocated}
