"""DMS on torchtune decoders (llama3, llama3.1, llama3.2, qwen2, qwen2.5 builders).

`add_dms(model, cfg)` validates the decoder and attaches the adapter modules (adapter variant);
the model keeps its torchtune structure and state-dict names, DMS parameters sit at
`layers.{i}.attn.dms_adapter.*`. The forward passes below reuse the decoder's own modules and call
the DMS core (decisions, masks, attention, cache) for everything DMS.

- `forward_train`: full sequences (training, teacher-forced eval), soft or hard decisions.
- `prefill` / `decode_step`: inference on the compact cache held by `InferenceState`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, decisions, fusion, stats
from .cache import (
    DMSKVCache,
    capacity_bucket,
    decode_stacked_begin,
    decode_stacked_end,
    default_decode_attention,
    stack_bookkeeping,
)
from .kernels.reference import decode_attention_prefix
from .config import DMSConfig
from .quant import fake_quantize_kv

SUPPORTED_MODELS = (
    "torchtune TransformerDecoder built by the llama3, llama3_1, llama3_2, qwen2 or qwen2_5 "
    "builders (self-attention layers with MultiHeadAttention, RoPE, no q/k norm)"
)


# ============================================================================ set-up
def add_dms(model: nn.Module, cfg: DMSConfig) -> nn.Module:
    """Make `model` a DMS model in place (and return it). Adds zero-initialised adapters for the
    adapter variant; the borrowed-neuron variant adds no parameters."""
    _validate(model)
    for layer in model.layers:
        attn = layer.attn
        decisions.sync_adapter(attn, cfg, attn.embed_dim, attn.num_kv_heads, attn.q_proj.weight.device)
    model.dms_config = cfg
    return model


def dms_config_of(model: nn.Module) -> DMSConfig:
    cfg = getattr(model, "dms_config", None)
    if cfg is None:
        raise ValueError("this model has no DMS: call dms_flex.add_dms(model, DMSConfig(...)) first")
    return cfg


def _validate(model: nn.Module) -> None:
    from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

    if not isinstance(model, TransformerDecoder):
        raise TypeError(f"add_dms got a {type(model).__name__}; supported: {SUPPORTED_MODELS}")
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, TransformerSelfAttentionLayer) or not isinstance(layer.attn, MultiHeadAttention):
            raise TypeError(f"layer {i} is a {type(layer).__name__}; supported: {SUPPORTED_MODELS}")
        a = layer.attn
        if a.q_norm is not None or a.k_norm is not None or a.pos_embeddings is None:
            raise TypeError(f"layer {i} uses q/k norms or no RoPE; supported: {SUPPORTED_MODELS}")


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (vocab, dim) output projection, tied or not."""
    out = model.output
    if hasattr(out, "tied_module"):
        return out.tied_module.weight
    return out.weight


# ============================================================================ per-layer pieces
def _project(attn, h: torch.Tensor):
    B, T, _ = h.shape
    q, k, v = fusion.project_qkv(attn, h)  # one GEMM after fusion.fuse_projections
    q = q.reshape(B, T, attn.num_heads, attn.head_dim)
    k = k.reshape(B, T, attn.num_kv_heads, attn.head_dim)
    v = v.reshape(B, T, attn.num_kv_heads, attn.head_dim)
    return q, k, v


def _decisions_and_rope(attn, q, k, x, pos, cfg: Optional[DMSConfig], rope_at=None):
    """q, k (B, T, H, D) from `_project` -> q, k (B, H, T, D) after RoPE and the decision logits
    (B, Hkv, T) (None without DMS): decisions.decide_and_rope with torchtune's RoPE, or with
    rope_at(attn, q, k) (a `_DecodeRoPE`: the same rotation at one position per row)."""

    def rope(q, k):
        if rope_at is not None:
            return rope_at(attn, q, k)
        # one call over the query and key heads side by side (RoPE acts on each head alone): half the
        # ops of two calls, which a CPU decode step pays per layer; bit-identical
        qk = attn.pos_embeddings(torch.cat([q, k], dim=1).transpose(1, 2), input_pos=pos).transpose(1, 2)
        return qk.split([q.shape[1], k.shape[1]], dim=1)

    return decisions.decide_and_rope(
        q.transpose(1, 2),
        k.transpose(1, 2),
        cfg,
        rope,
        attn.num_kv_heads,
        adapter=getattr(attn, "dms_adapter", None),
        x=x,
    )


def attention_inputs(layer, x: torch.Tensor, input_pos: torch.Tensor, cfg: Optional[DMSConfig], rope_at=None):
    """norm -> project -> decide + RoPE for one layer: q (B, Hq, T, D), k, v (B, Hkv, T, D), decision
    logits (B, Hkv, T) (None without DMS). The first half of every layer loop below. rope_at: see
    `_decisions_and_rope`."""
    h = _norm(layer.sa_norm, x)
    q, k, v = _project(layer.attn, h)
    q, k, logits = _decisions_and_rope(layer.attn, q, k, x, input_pos, cfg, rope_at)
    return q, k, v.transpose(1, 2), logits


class _DecodeRoPE:
    """torchtune's RoPE (`RotaryPositionalEmbeddings`, `Llama3ScaledRoPE`: x_{2i} cos - x_{2i+1} sin,
    x_{2i+1} cos + x_{2i} sin, in float32) at one position per row, for an eager decode step: each
    rotary module's cos and sin at `pos` (B,) are read once per step, interleaved as (c, c) and
    (-s, s) per pair, and q and k of a layer are rotated together as x * cos + swap(x) * sin: three
    elementwise ops where the module spends ~20 per layer on the CPU. Bit-identical to the module
    (x * -s is -(x * s) exactly, a + -b is a - b; tests/test_inference.py). Other rotary modules
    (Qwen2's) are called as they are."""

    def __init__(self, pos: torch.Tensor):
        self.pos = pos
        self.tables = {}

    def _table(self, pe):
        if type(pe) not in _torchtune_types()[1:] or pe.cache.dim() != 3:
            return None
        c, s = pe.cache[self.pos].unbind(-1)  # (B, D/2) each
        B = c.shape[0]
        return torch.stack([c, c], -1).view(B, 1, 1, -1), torch.stack([-s, s], -1).view(B, 1, 1, -1)

    def __call__(self, attn, q: torch.Tensor, k: torch.Tensor):
        """q (B, Hq, 1, D), k (B, Hkv, 1, D) -> both rotated, same layout."""
        pe = attn.pos_embeddings
        key = id(pe)
        if key not in self.tables:
            self.tables[key] = (pe, self._table(pe))  # pe kept: its id stays its own for the step
        table = self.tables[key][1]
        qk = torch.cat([q, k], dim=1)
        if table is None:
            qk = pe(qk.transpose(1, 2), input_pos=self.pos[:, None]).transpose(1, 2)
        else:
            cos, sin = table
            x = qk if qk.dtype == torch.float32 else qk.float()
            rot = x * cos
            rot += x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin
            qk = rot if rot.dtype == qk.dtype else rot.to(qk.dtype)
        return qk.split([q.shape[1], k.shape[1]], dim=1)


_TORCHTUNE_TYPES: tuple = ()


def _torchtune_types() -> tuple:
    """(RMSNorm, RotaryPositionalEmbeddings, Llama3ScaledRoPE), imported once (torchtune is imported lazily;
    a module global, not functools.lru_cache, which dynamo warns about inside compiled steps)."""
    global _TORCHTUNE_TYPES
    if not _TORCHTUNE_TYPES:
        from torchtune.models.llama3_1 import Llama3ScaledRoPE
        from torchtune.modules import RMSNorm, RotaryPositionalEmbeddings

        _TORCHTUNE_TYPES = (RMSNorm, RotaryPositionalEmbeddings, Llama3ScaledRoPE)
    return _TORCHTUNE_TYPES


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x); torchtune's RMSNorm on float32 x as its one F.rms_norm call (its float() and to() are
    no-ops there, each still a dispatched op per call on the CPU)."""
    if type(norm) is _torchtune_types()[0] and x.dtype == torch.float32:
        return F.rms_norm(x, norm.normalized_shape, norm.scale, norm.eps)
    return norm(x)


def _scaled(scale: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's sa_scale / mlp_scale (nn.Identity unless configured) applied to x."""
    return x if type(scale) is nn.Identity else scale(x)


def run_layers(
    model: nn.Module, x: torch.Tensor, input_pos: torch.Tensor, cfg: Optional[DMSConfig], attend, halves=None
) -> torch.Tensor:
    """THE per-layer loop of every cached pass (prefill chunks, decode steps, the baselines' caches):
    norm -> project -> decide + RoPE -> attend -> finish. attend(i, q, k, v, logits) -> (B, Hq, T, D)
    is the cache-specific part for layer i; halves: (attention_inputs, finish_layer) replacements
    (e.g. compiled). Returns the residual stream after the last layer (before the final norm)."""
    before, after = halves or (attention_inputs, finish_layer)
    for i, layer in enumerate(model.layers):
        q, k, v, logits = before(layer, x, input_pos, cfg)
        x = after(layer, x, attend(i, q, k, v, logits))
    return x


def finish_layer(layer, x, attn_out):
    B, T = x.shape[:2]
    h = _scaled(layer.sa_scale, layer.attn.output_proj(attn_out.transpose(1, 2).reshape(B, T, -1))) + x
    return h + _scaled(layer.mlp_scale, fusion.feed_forward(layer.mlp, _norm(layer.mlp_norm, h)))


# ============================================================================ full sequences
@dataclass
class TrainOutput:
    hidden: torch.Tensor  # (B, T, dim) after the final norm
    alpha_st: List[torch.Tensor] = field(default_factory=list)  # per layer (B, Hkv, T), straight-through
    evicted: List[torch.Tensor] = field(default_factory=list)  # per layer (B, Hkv, T) hard decisions


def forward_train(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    doc_ids: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
    eviction: bool = True,
    training: Optional[bool] = None,
    activation_checkpointing: bool = False,
    backend: str = "auto",
    generator: Optional[torch.Generator] = None,
    kv_int8: bool = False,
) -> TrainOutput:
    """Full-sequence DMS forward. eviction=False runs the unmodified model (the teacher).

    kv_int8: K and V pass through the int8 cache's quantize-dequantize round trip (straight-through
    gradient): the numerics of an int8 compact cache, for quantization-aware retrofits and as the
    reference of int8 inference.

    doc_ids (B, T) for packed samples; input_pos (B, T) defaults to positions within each document.
    training (default model.training): soft decisions with logistic noise; else the hard rule.
    """
    cfg = dms_config_of(model) if eviction else None
    fusion.refresh(model)  # a fused model copied, moved or re-wrapped since: fused again or not at all
    training = model.training if training is None else training
    B, T = tokens.shape
    if input_pos is None:
        input_pos = _positions_within_documents(doc_ids, B, T, tokens.device)
    block_mask = None
    if backend == "auto":  # one decision for all layers (same device and head size)
        backend = attention.resolve_backend(tokens.device, model.layers[0].attn.head_dim)
    if tokens.is_cuda and backend == "flex":
        block_mask = attention.make_block_mask(doc_ids, B, T, tokens.device)
    window = cfg.effective_window if cfg is not None else T
    out = TrainOutput(hidden=None)
    x = model.tok_embeddings(tokens)
    for layer in model.layers:
        noise = None
        if cfg is not None and training:
            noise = decisions.logistic_noise((B, layer.attn.num_kv_heads, T), tokens.device, generator)

        def run(x, noise=noise, layer=layer):
            q, k, v, logits = attention_inputs(layer, x, input_pos, cfg)
            if kv_int8:
                k, v = fake_quantize_kv(k), fake_quantize_kv(v)
            if cfg is None:
                log_keep = torch.zeros(B, k.shape[1], T, device=x.device)
                a_st = log_keep
            else:
                decided = decisions.shift_to_decided_token(logits, doc_ids)
                log_keep, a_st = decisions.relax(decided, cfg, training=training, noise=noise)
            o = attention.dms_attention(
                q, k, v, log_keep, window, doc_ids=doc_ids, block_mask=block_mask, backend=backend
            )
            return finish_layer(layer, x, o), a_st, log_keep

        if activation_checkpointing and torch.is_grad_enabled():
            x, a_st, log_keep = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        else:
            x, a_st, log_keep = run(x)
        if cfg is not None:
            out.alpha_st.append(a_st)
            out.evicted.append(a_st.detach() > 0.5)
    out.hidden = model.norm(x)
    return out


def logits_of(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.output(hidden)


def _positions_within_documents(doc_ids, B, T, device):
    pos = torch.arange(T, device=device)[None].expand(B, T)
    if doc_ids is None:
        return pos
    start = torch.ones(B, T, dtype=torch.bool, device=device)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=1).values
    return pos - first


# ============================================================================ inference
class CacheState(nn.Module):
    """Per-layer caches (slot stores) plus each row's next position, and their accounting: the one
    place where live KV bytes and the CR are computed, for DMS and for the baselines' caches."""

    def __init__(self, caches, batch_size: int, max_seq_len: int, dtype, device, eviction: bool, window: int):
        super().__init__()
        self.caches = nn.ModuleList(caches)
        self.max_seq_len, self.eviction, self.window = max_seq_len, eviction, window
        self.model_itemsize = torch.empty((), dtype=dtype).element_size()
        self.register_buffer("next_pos", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.pending = None  # generation.generate_tokens: each row's last sampled token, not yet in the cache

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    def reset(self) -> None:
        for c in self.caches:
            c.reset()
        self.next_pos.zero_()
        self.pending = None

    def check_overflow(self) -> None:
        for c in self.caches:
            c.check_overflow()

    def overflow_flag(self) -> torch.Tensor:
        """0-d bool on the device: did any layer's cache overflow (no host sync; see check_overflow)."""
        return torch.stack([c.overflow for c in self.caches]).any()

    def kv_bytes(self) -> dict:
        """Live KV bytes vs what a dense cache would hold for the same tokens."""
        c0 = self.caches[0]
        per_slot = c0.bytes_per_slot()
        live = sum(int(c.length.sum()) for c in self.caches) * per_slot
        # what a dense cache in the model's dtype would hold for the same tokens
        dense = int(self.next_pos.sum()) * c0.k.shape[1] * len(self.caches) * 2 * c0.k.shape[-1] * self.model_itemsize
        allocated = sum(c.k.shape[0] * c.k.shape[1] * c.k.shape[2] for c in self.caches) * per_slot
        return {"live": live, "dense": dense, "allocated": allocated}

    def compression(self) -> stats.CompressionReport:
        seen = self.next_pos.clamp_min(1)[:, None].float()
        return stats.compression_report([c.length.float() / seen for c in self.caches])


class InferenceState(CacheState):
    """The DMS caches of all layers (one DMSKVCache each) plus each row's next position."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        capacity: Optional[Union[int, Sequence[int]]] = None,
        max_seq_len: Optional[int] = None,
        dtype=None,
        device=None,
        eviction: bool = True,
        kv_dtype=None,
    ):
        """capacity: KV slots per (row, KV head), one number for every layer or one per layer (e.g. from
        `layer_capacities`); default max_seq_len, which never overflows. "auto": each layer starts small and
        grows while prompts are prefilled to what its fullest (row, KV head) keeps (never beyond
        max_seq_len), and `reserve(n)` (which `generate_tokens` calls) then sizes it to that plus n decode
        steps: the allocation follows the prompts actually given, with no calibration."""
        cfg = dms_config_of(model)
        fusion.refresh(model)  # a fused model copied or moved since: fused again (dms_flex/fusion.py)
        p = next(model.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        max_seq_len = max_seq_len or model.max_seq_len
        if model.max_seq_len is not None and max_seq_len > model.max_seq_len:
            # positions past the model's RoPE table would index out of it (a device-side assert on CUDA)
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the model's max_seq_len={model.max_seq_len} (the length its "
                "rotary embeddings were built for); load the model with a larger max_seq_len "
                "(load_dms_model(..., max_seq_len=N)) or ask for fewer positions"
            )
        auto = isinstance(capacity, str) and capacity == "auto"
        capacities = _per_layer_capacities(
            min(max_seq_len, AUTO_INITIAL_CAPACITY) if auto else capacity, max_seq_len, len(model.layers)
        )
        # without eviction the window covers everything: the cache is a plain dense cache
        window = cfg.effective_window if eviction else max_seq_len
        attn0 = model.layers[0].attn
        caches = [
            DMSKVCache(batch_size, attn0.num_kv_heads, attn0.head_dim, c, window, dtype, device, kv_dtype)
            for c in capacities
        ]
        for c in caches if auto else ():
            c.max_capacity = max_seq_len
        self.reserve_extra = 0  # slots `reserve` adds to what it is asked for (benchmarks that step further)
        super().__init__(caches, batch_size, max_seq_len, dtype, device, eviction, window)
        # on the CPU the caches' bookkeeping buffers are views of stacked tensors, so that an eager decode
        # step does the bookkeeping of all layers at once (_decode_step_stacked)
        self.stacked = stack_bookkeeping(caches) if torch.device(device).type == "cpu" else None

    @property
    def growable(self) -> bool:
        """Made with capacity="auto": prefill grows the caches, `reserve` sizes them for decoding."""
        return any(c.max_capacity is not None for c in self.caches)

    def reserve(self, n: int) -> bool:
        """capacity="auto": make room in every layer's cache for its fullest (row, KV head) plus n more tokens
        (one host sync). Sizes come from `capacity_bucket` (256, 384, 512, 768, ... from the starting size): a
        cache grows to the bucket of what it needs and shrinks only when it holds twice that, so a conversation
        changes the shapes a compiled step sees a few times, not every turn. On the CPU every layer gets the largest size,
        so the eager step keeps its stacked bookkeeping (`stack_bookkeeping` needs one shape). Returns True
        when a buffer was re-allocated (a captured decode graph must then be captured again). Fixed
        capacities: nothing to do, False. `reserve_extra` slots are added to n."""
        if not self.growable:
            return False
        n = int(n) + self.reserve_extra
        fullest = torch.stack([c.length.max() for c in self.caches]).tolist()  # every layer's, in one host sync
        sizes = []
        for c, live in zip(self.caches, fullest):
            want = min(self.max_seq_len, capacity_bucket(int(live) + n, c.bucket_base))
            sizes.append(c.capacity if want <= c.capacity < 2 * want else want)
        if self.stacked is not None:  # one size for all layers
            sizes = [max(sizes)] * len(sizes)
        changed = False
        for c, size in zip(self.caches, sizes):
            if size != c.capacity:
                c.resize(size)
                changed = True
        if self.stacked is not None and not self.stacked.current(self.caches):
            with torch.inference_mode(False):  # equal capacities stack again (else per layer), as normal tensors
                self.stacked = stack_bookkeeping(self.caches)
        return changed


AUTO_INITIAL_CAPACITY = 256  # slots per (row, KV head) a capacity="auto" cache starts with


def _per_layer_capacities(capacity, max_seq_len: int, n_layers: int) -> List[int]:
    """InferenceState's capacity argument as one slot count per layer, each checked."""
    if capacity is None:
        return [max_seq_len] * n_layers
    if isinstance(capacity, (bool, str, bytes)) or not isinstance(capacity, (int, Sequence)):
        raise TypeError(f"capacity must be an int, one int per layer or 'auto', got {capacity!r}")
    caps = [capacity] * n_layers if isinstance(capacity, int) else list(capacity)
    if len(caps) != n_layers:
        raise ValueError(f"capacity has {len(caps)} entries; the model has {n_layers} layers (give one per layer)")
    for i, c in enumerate(caps):
        where = f"layer {i}'s " if not isinstance(capacity, int) else ""
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{where}cache capacity={c!r} must be a whole number of slots >= 1")
        if c > max_seq_len:
            raise ValueError(f"{where}cache capacity={c} exceeds max_seq_len={max_seq_len}")
    return caps


@torch.no_grad()
def layer_capacities(model: nn.Module, tokens: torch.Tensor, max_seq_len: int, headroom: float = 1.5) -> List[int]:
    """Slots per (row, KV head) for each layer of a compact cache of `max_seq_len` positions, sized from
    what DMS keeps of sample text. `tokens` (B, T) are prefilled into a full cache; in each layer the
    (row, KV head) that keeps the most tokens keeps the window w (always) and a fraction f of the T - w
    older tokens, so the layer gets min(max_seq_len, w + ceil(headroom x f x (max_seq_len - w))) slots:
    layers whose heads keep every token get max_seq_len, and so does every layer when T <= w (nothing
    measured). What a head keeps varies from text to text: calibrate on several samples like the workload
    (rows of `tokens`; benchmarks/RESULTS.md section 24f: 8 windows of 2,048 tokens, headroom 1.5, held 8
    other windows of the same text; 1.25 did not). A step that finds no free slot raises CacheOverflowError
    (nothing is overwritten)."""
    if not headroom >= 1.0:
        raise ValueError(f"headroom={headroom} must be >= 1 (a multiple of the sample's largest need)")
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (batch, length) with length >= 1, got shape {tuple(tokens.shape)}")
    T = tokens.shape[1]
    state = InferenceState(model, tokens.shape[0], max_seq_len=T)
    prefill(model, tokens, state)
    return capacities_from_state(state, max_seq_len, headroom)


def capacities_from_state(state: "InferenceState", max_seq_len: int, headroom: float = 1.5) -> List[int]:
    """`layer_capacities`' rule applied to a state whose every row has seen the same number of tokens."""
    fullest = torch.stack([c.length.max() for c in state.caches]).tolist()
    return capacities_from_fullest(fullest, int(state.next_pos.max()), state.window, max_seq_len, headroom)


def capacities_from_fullest(
    fullest: Sequence[int], seen: int, window: int, max_seq_len: int, headroom: float = 1.5
) -> List[int]:
    """`layer_capacities`' rule: per layer, the most tokens any (row, KV head) keeps (`fullest`) after `seen`
    tokens, scaled to `max_seq_len` positions: the window w always, plus headroom x the kept fraction of the
    older tokens. Shared by the torchtune path and `dms_flex.hf.DMSCache.calibrated_capacities`."""
    if not headroom >= 1.0:
        raise ValueError(f"headroom={headroom} must be >= 1 (a multiple of the sample's largest need)")
    w = min(window, seen)
    caps = []
    for kept in fullest:
        f = (int(kept) - w) / (seen - w) if seen > w else 1.0
        need = w + math.ceil(headroom * f * max(max_seq_len - w, 0))
        caps.append(int(min(max_seq_len, max(need, 1))))
    return caps


def _check_dms_state(state) -> None:
    if not isinstance(state, InferenceState):
        raise TypeError(
            f"prefill / decode_step drive an InferenceState (DMS caches), got a {type(state).__name__}; "
            f"a baseline's PolicyState is driven by prefill_with_policy / decode_step_with_policy"
        )


def prefill_positions(tokens: torch.Tensor, state: CacheState, lengths: Optional[torch.Tensor] = None):
    """Checks a prefill's arguments; returns (lengths (B,), first position (B,), positions (B, n)).

    Positions of padding past a row's length are clamped into the RoPE table (their outputs are unused).
    """
    B, n = tokens.shape
    if B != state.batch_size:
        raise ValueError(f"tokens have batch {B} but the cache was made for {state.batch_size}")
    if lengths is None:
        lengths = torch.full((B,), n, dtype=torch.long, device=tokens.device)
    lengths = lengths.to(tokens.device)
    if bool((lengths < 0).any()) or bool((lengths > n).any()):
        raise ValueError(f"lengths must be in [0, {n}], got {lengths.tolist()}")
    if int((state.next_pos + lengths).max()) > state.max_seq_len:
        raise ValueError(
            f"the sequence would reach {int((state.next_pos + lengths).max())} tokens, beyond "
            f"max_seq_len={state.max_seq_len}; start a new cache or raise max_seq_len"
        )
    pos = state.next_pos.clone()
    input_pos = pos[:, None] + torch.arange(n, device=tokens.device)[None]
    input_pos = torch.minimum(input_pos, torch.full_like(input_pos, state.max_seq_len - 1))
    return lengths, pos, input_pos


_PREFILL_COMPILE = {"ok": True}  # False once a compiled prefill failed on this torch


def _use_compiled_prefill(requested: bool, tokens: torch.Tensor) -> bool:
    return bool(requested) and tokens.is_cuda and _PREFILL_COMPILE["ok"]


# tokens per prefill chunk over the whole batch: long prompts are appended chunk by chunk, so peak
# memory grows with the chunk and the live cache, not with the prompt (docs/design.md, "Prefill")
PREFILL_CHUNK_TOKENS = 65536


def prefill_chunk_size(batch_size: int) -> int:
    """Positions per row in one prefill chunk (a multiple of 128, at least 256)."""
    return max(256, PREFILL_CHUNK_TOKENS // max(batch_size, 1) // 128 * 128)


@torch.no_grad()
def prefill(
    model: nn.Module,
    tokens: torch.Tensor,
    state: InferenceState,
    lengths: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    compile: bool = False,
) -> torch.Tensor:
    """Append tokens (B, n) (right-padded; `lengths` (B,) real tokens per row) to the cache.

    Works on an empty cache (the prompt) and on a live one (a later turn); a prompt longer than
    `chunk_size` positions (default `prefill_chunk_size(B)`) is appended in chunks, each a later
    turn of the one before, which gives the same result. Returns the logits of each row's last
    real token, (B, vocab). compile: on CUDA, the per-layer work around attention (norms,
    projections, decisions, RoPE, MLP) runs as torch.compile'd graphs with dynamic shapes (one
    compile for every layer and prompt length; attention and the cache stay eager). A compiler
    failure warns once and falls back to eager.
    """
    dms_config_of(model)
    _check_dms_state(state)
    B, n = tokens.shape
    lengths, pos, input_pos = prefill_positions(tokens, state, lengths)
    chunk = chunk_size or prefill_chunk_size(B)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk} must be >= 1")
    rows = torch.arange(B, device=tokens.device)
    last_x = None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        n_real = (lengths - c0).clamp(0, c1 - c0)
        args = (model, tokens[:, c0:c1], state, state.next_pos.clone(), n_real, input_pos[:, c0:c1])
        x = _prefill_chunk(*args, compiled=_use_compiled_prefill(compile, tokens))
        # each row's last real token, from the chunk that holds it
        at = (lengths - 1 - c0).clamp(0, c1 - c0 - 1)
        picked = x[rows, at]
        holds = ((lengths - 1 >= c0) & (lengths - 1 < c1))[:, None]
        last_x = picked if last_x is None else torch.where(holds, picked, last_x)
        state.next_pos.add_(n_real)
    return model.output(model.norm(last_x))


def _prefill_chunk(model, tokens, state: InferenceState, pos, n_real, input_pos, compiled: bool = False):
    """All layers over one chunk: returns the residual stream (B, n, dim) before the final norm.
    compiled: the layer halves around attention run through torch.compile (dynamic shapes; CUDA)."""
    cfg = dms_config_of(model) if state.eviction else None
    x = model.tok_embeddings(tokens)
    halves = None
    if compiled and _compiled_halves_work(model.layers[0], x, input_pos, cfg):
        halves = _compiled_layer_halves()

    def attend(i, q, k, v, logits):
        return state.caches[i].append(q, k, v, logits, pos, n_real)

    return run_layers(model, x, input_pos, cfg, attend, halves)


def _compiled_halves_work(layer, x, input_pos, cfg) -> bool:
    """Compile both halves once on a throw-away call (nothing is appended to any cache): a compiler
    failure warns once and prefill stays eager."""
    if _PREFILL_COMPILE.get("checked"):
        return _PREFILL_COMPILE["ok"]
    before, after = _compiled_layer_halves()
    try:
        q = before(layer, x, input_pos, cfg)[0]
        after(layer, x, torch.zeros_like(q))
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a compiler limitation must not stop inference: warn, run eager
        _PREFILL_COMPILE["ok"] = False
        warnings.warn(f"compiled prefill failed ({type(e).__name__}: {str(e)[:300]}); prefill runs eager")
    _PREFILL_COMPILE["checked"] = True
    return _PREFILL_COMPILE["ok"]


@functools.lru_cache(maxsize=None)
def _compiled_layer_halves():
    return (
        torch.compile(attention_inputs, dynamic=True, fullgraph=True),
        torch.compile(finish_layer, dynamic=True, fullgraph=True),
    )


@torch.no_grad()  # an inference step: with autograd on, a compiled step's in-place cache writes went wrong
def decode_step(
    model: nn.Module, token: torch.Tensor, state: InferenceState, attend: Optional[Callable] = None
) -> torch.Tensor:
    """One token per row: token (B, 1) at position state.next_pos. Returns logits (B, vocab).

    Static shapes and no host syncs: compile it with torch.compile(fullgraph=True,
    mode="reduce-overhead") to run it as one CUDA graph.
    """
    _check_dms_state(state)
    if attend is None and token.device.type == "cpu" and not torch.compiler.is_compiling():
        logits = _decode_step_stacked(model, token, state)
        if logits is not None:
            return logits
    cfg = dms_config_of(model) if state.eviction else None
    read = attend or default_decode_attention(token.device)
    pos = state.next_pos
    if attend is None and _rope_in_update(model, token, state.max_seq_len):
        return _decode_step_rope_in_update(model, token, state, cfg, read)

    def step(i, q, k, v, logits):
        cache = state.caches[i]
        cache.decode_update(k, v, _evict_prev(logits, k), pos)
        return read(q, cache)

    x = run_layers(model, model.tok_embeddings(token), pos[:, None], cfg, step)
    state.next_pos.add_(1)
    return model.output(model.norm(x))[:, -1]


def _evict_prev(logits: Optional[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """A decode step's decisions about each row's previous token, (B, Hkv) bool, from the layer's decision
    logits (B, Hkv, 1); nothing is evicted without them (eviction off)."""
    if logits is None:
        return torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)
    return decisions.hard_evict(logits[..., 0])


def _rope_in_update(model: nn.Module, token: torch.Tensor, positions: int = 0) -> bool:
    """Whether decode_step rotates q and k inside the fused cache update (kernels/decode_update.py,
    `decode_rope_update`): on CUDA (or the Triton interpreter), with torchtune's interleaved RoPE tables in
    float32 covering `positions` positions (the state's max_seq_len) and a power-of-two head dim >= 16
    (`rope_table_fits`); other rotary modules, and a model cast to bf16 (its table too), keep the separate
    RoPE."""
    from .kernels import decode_update as du

    if token.device.type != "cuda" and not du.ta.interpreting():
        return False
    for layer in model.layers:
        pe = layer.attn.pos_embeddings
        if type(pe) not in _torchtune_types()[1:] or not du.rope_table_fits(
            layer.attn.head_dim, getattr(pe, "cache", None), positions
        ):
            return False
    return True


def _decision_in_kernel(layer, x: torch.Tensor, cfg: DMSConfig):
    """The `Decision` with which the fused kernel computes the layer's decisions itself (the borrowed
    channel; the float32 adapter's one-token form, `DMSAdapter.one_token`), or None (decide outside)."""
    from .kernels.decode_update import Decision

    layer_scope = cfg.scope == "layer"
    if cfg.decision == "borrowed":
        return Decision("borrowed", cfg.alpha_scale, cfg.alpha_offset, layer_scope)
    adapter = getattr(layer.attn, "dms_adapter", None)
    if (
        adapter is None
        or not decisions.DMSAdapter.compiled_one_token
        or adapter.linear.weight.dtype != torch.float32
        or (adapter.norm.weight is not None and adapter.norm.weight.dtype != torch.float32)
    ):
        return None
    return Decision(
        "adapter",
        cfg.alpha_scale,
        cfg.alpha_offset,
        layer_scope,
        x,
        adapter.linear.weight,
        adapter.norm.weight,
        adapter.one_token_eps,
    )


def _decode_inputs_before_rope(layer, x: torch.Tensor, input_pos: torch.Tensor, cfg: Optional[DMSConfig]):
    """`attention_inputs` without the RoPE (and without the borrowed channel's zeroing): q (B, Hq, 1, D),
    k, v (B, Hkv, 1, D) as the projection gives them, and the decisions: a `Decision` the fused kernel
    computes them from, the logits where it cannot (decisions.decide), or None without DMS."""
    h = _norm(layer.sa_norm, x)
    q, k, v = _project(layer.attn, h)
    q = q.transpose(1, 2)
    decided = _decision_in_kernel(layer, x, cfg) if cfg is not None else None
    if decided is None:
        decided = decisions.decide(
            q, cfg, layer.attn.num_kv_heads, adapter=getattr(layer.attn, "dms_adapter", None), x=x
        )
    return q, k.transpose(1, 2), v.transpose(1, 2), decided


def _decode_step_rope_in_update(model, token, state, cfg, read) -> torch.Tensor:
    """decode_step with each layer's decisions, RoPE of q and k, the borrowed channel's zeroing and the cache
    update in one kernel (`decode_rope_update`): four fewer kernels per layer than the decision kernel,
    inductor's RoPE, its float32 intermediate and the copies of q and k it makes for the two ops
    (benchmarks/RESULTS.md, section 27)."""
    from .kernels.decode_update import Decision, decode_rope_update

    pos = state.next_pos
    borrowed = cfg is not None and cfg.decision == "borrowed"

    def step(i, q, k, v, decided):
        cache = state.caches[i]
        table = model.layers[i].attn.pos_embeddings.cache
        if isinstance(decided, Decision):
            q = decode_rope_update(cache, q, k, v, table, None, pos, borrowed, decided)
        else:
            q = decode_rope_update(cache, q, k, v, table, _evict_prev(decided, k), pos, borrowed)
        return read(q, cache)

    halves = (_decode_inputs_before_rope, finish_layer)
    x = run_layers(model, model.tok_embeddings(token), pos[:, None], cfg, step, halves)
    state.next_pos.add_(1)
    return model.output(model.norm(x))[:, -1]


def _decode_step_stacked(model: nn.Module, token: torch.Tensor, state: InferenceState) -> Optional[torch.Tensor]:
    """decode_step on the CPU, eager, in fewer dispatched ops (each costs microseconds there, and a step
    pays them per layer): the cache bookkeeping of all layers at once before the layer loop
    (`cache.decode_stacked_begin`) and the predecessors' marks of all layers after it, one RoPE table
    per step (`_DecodeRoPE`), attention over lengths read once per step. The same results as the
    per-layer step, bit for bit (tests/test_inference.py). Returns None, having changed nothing, when
    it does not apply (int8 cache, caches not stacked, or a step `decode_stacked_begin` leaves to the
    per-layer `decode_update`)."""
    stack = getattr(state, "stacked", None)
    if stack is None or state.caches[0].quantized or not stack.current(state.caches):
        return None
    pos = state.next_pos
    step = decode_stacked_begin(stack, state.caches[0].window, pos)
    if step is None:
        return None
    cfg = dms_config_of(model) if state.eviction else None
    decided = []

    def attend(i, q, k, v, logits):
        cache = state.caches[i]
        cache._write_rows(k, v, step.kv_rows[i])
        if logits is not None:
            decided.append(logits[..., 0])
        return decode_attention_prefix(q, cache, step.lengths[i], step.dead[i])

    before = functools.partial(attention_inputs, rope_at=_DecodeRoPE(pos))
    x = run_layers(model, model.tok_embeddings(token), pos[:, None], cfg, attend, (before, finish_layer))
    decode_stacked_end(stack, step, decisions.hard_evict(torch.stack(decided)) if decided else None)
    state.next_pos.add_(1)
    return model.output(model.norm(x))[:, -1]
