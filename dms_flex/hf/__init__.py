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
first, and the module that holds each part:

1. `model`: each attention module's `forward` is replaced (an instance attribute bound to
   `_dms_self_attention_forward`; class, submodules and state-dict names are untouched). It runs the
   module's own projections, q/k norms and the modeling file's own `apply_rotary_pos_emb`, and in
   between takes the decision logits from `dms_flex.decisions` (borrowed neuron or adapter);
2. `attention`: the attention itself goes through transformers' extension point:
   `AttentionInterface.register("dms", dms_attention_forward)` and the model's attention
   implementation is set to "dms". That function is where the eviction rule lives, and it only calls
   `dms_flex.masks` (full-sequence path), `dms_flex.cache.DMSKVCache.append` (prefill, later turns)
   and `DMSKVCache.decode_update` + the decode attention of `dms_flex.cache` (one token per step);
3. `attention`: `AttentionMaskInterface.register("dms", dms_padding_mask)`: transformers then hands
   the attention function the (batch, new tokens) padding mask instead of a 4-D causal mask (DMS
   builds its own visibility);
4. `cache`: `DMSCache`, a `transformers.Cache` whose layers (`DMSCacheLayer`) each own one
   `DMSKVCache`;
5. `model`: hooks (`register_forward_pre_hook(with_kwargs=True)`): one on each decoder layer passes
   the layer's input residual x to its attention module as the keyword `dms_residual` (the adapter
   variant reads it: l = Linear(RMSNorm(x))), and one on the inner model (`model.model`) swaps the empty
   `DynamicCache` that `generate()` creates for a `DMSCache` and sets `position_ids` from the cache
   (live tokens per row), so RoPE positions and the cache's positions agree by construction, left
   padding and multi-turn included.

`loading`: `from_pretrained` / `save_pretrained` (local Hugging Face folders, the DMS keys of
config.json, the adapter tensors).

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
`dms_flex.checkpoints.keys` maps to torchtune's `layers.{i}.attn.dms_adapter.*`.

Imports go one way: `cache` <- `attention` <- `model` <- `loading`.
"""

from .attention import ATTN_IMPLEMENTATION, decided_logits, dms_attention_forward, dms_padding_mask
from .cache import DMSCache, DMSCacheLayer
from .loading import from_pretrained, inference_layout, save_pretrained
from .model import (
    SUPPORTED_ARCHITECTURES,
    capture_decisions,
    dms_config_from_hf,
    dms_config_of,
    enable_dms,
    eviction_disabled,
    set_eviction,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ATTN_IMPLEMENTATION",
    "from_pretrained",
    "inference_layout",
    "save_pretrained",
    "enable_dms",
    "dms_config_of",
    "dms_config_from_hf",
    "set_eviction",
    "eviction_disabled",
    "capture_decisions",
    "DMSCache",
    "DMSCacheLayer",
    "dms_attention_forward",
    "dms_padding_mask",
    "decided_logits",
]
