"""Memory: the labelled ESTIMATE of an adapter-only retrofit on a quantized base (the formula behind the prior of
dms_flex/retrofit/memory_fit.py, whose message the recipe now logs at start-up for every variant), and the
MEASURED peak (logged with each step's metrics and at the end)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from omegaconf import DictConfig

from dms_flex.config import DMSConfig


def capacity_estimate(hf: Dict[str, Any], base_weights: str, dms: DMSConfig, cfg: DictConfig) -> str:
    """A rough, clearly labelled ESTIMATE of one device's memory for an adapter-only retrofit on a
    quantized frozen base (not measured): weights as stored, the adapter's fp32 master weights, grads
    and Adam state, and activations of one micro-batch."""
    L, d, V = int(hf["num_hidden_layers"]), int(hf["hidden_size"]), int(hf["vocab_size"])
    ff, H, Hkv = int(hf["intermediate_size"]), int(hf["num_attention_heads"]), int(hf["num_key_value_heads"])
    hd = int(hf.get("head_dim") or d // H)
    linear = L * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * ff)
    out_proj = 0 if hf.get("tie_word_embeddings") else V * d
    per_param = {"int8": 1.0 + 4 / d, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}[base_weights]  # values + scales
    plain_bytes = 2 * (V * d + L * 2 * d + d)  # embeddings and norms stay in the compute dtype
    weights = (linear + out_proj) * per_param + plain_bytes
    adapter = L * (d * Hkv + d) if dms.decision == "adapter" else 0  # per layer: RMSNorm + Linear(d, Hkv)
    optim = adapter * 4 * 4  # fp32 master weight, gradient, Adam exp_avg and exp_avg_sq
    tokens = int(cfg.batch_size) * int(cfg.max_seq_len)
    ckpt_on = bool(cfg.get("enable_activation_checkpointing", False))
    # bf16 activations: with checkpointing one saved input per layer plus one layer's working set
    # (q, k, v, attention output, MLP hidden x 3); without it every layer's working set is kept
    layer_set = tokens * 2 * (d + H * hd + 2 * Hkv * hd + d + 3 * ff)
    acts = tokens * 2 * d * L + layer_set if ckpt_on else layer_set * L
    # dense masked attention scores (CPU path; the GPU flex path does not materialise them) are
    # left out; the chunked distillation holds two fp32 logit chunks of kd_chunk_size x vocab
    kd = 2 * 2 * int(cfg.get("kd_chunk_size", 1024)) * V * 4
    total = weights + optim + acts + kd
    gib = 2**30
    return (
        f"ESTIMATE (not a measurement) of one device's memory for this adapter-only retrofit on a "
        f"{base_weights} base: weights {weights / gib:.2f} GiB ({(linear + out_proj) / 1e9:.2f}B quantized "
        f"linear params at ~{per_param:.2f} B/param + embeddings/norms in bf16); adapter {adapter:,} params, "
        f"fp32 weights+grads+Adam {optim / 2**20:.1f} MiB; activations ~{acts / gib:.2f} GiB "
        f"({tokens} tokens/micro-batch, bf16, activation checkpointing {'on' if ckpt_on else 'off'}); "
        f"distillation logit chunks ~{kd / gib:.2f} GiB; total ~{total / gib:.1f} GiB before allocator and "
        f"CUDA context overhead: a lower bound. Measured for SmolLM2-135M on an H200 (RESULTS.md 16), the "
        f"real peak was ~1.5x this total in eager mode and ~1.25x with compile=true"
    )


def peak_memory(device: torch.device) -> Dict[str, float]:
    """Measured peak memory so far, in GiB: on CUDA the caching allocator's peak allocated and
    reserved bytes of this device; elsewhere the process's peak resident set size."""
    if device.type == "cuda":
        return {
            "peak_cuda_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_cuda_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    import resource

    return {"peak_process_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def peak_memory_message(device: torch.device) -> str:
    mem = peak_memory(device)
    return "MEASURED peak memory of training on this rank: " + ", ".join(
        f"{k.replace('peak_', '').replace('_GiB', '')} {v:.2f} GiB" for k, v in mem.items()
    )
