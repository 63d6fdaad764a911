"""Sampling and the generation loop over the compact cache (gpt-fast style: plain functions)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from . import torchtune_model as tm


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 or None")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> tokens (B, 1)."""
    if cfg.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # new tokens per row (stop token included when hit)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0
    stopped: List[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over all rows."""
        return self.decode_steps * len(self.tokens) / max(self.decode_seconds, 1e-9)


def pad_prompts(prompts: Sequence[Sequence[int]], device) -> tuple:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([len(p) for p in prompts], device=device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], state: tm.InferenceState, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
             step_fn: Optional[Callable] = None, on_token: Optional[Callable[[int, int], None]] = None,
             generator: Optional[torch.Generator] = None) -> GenerationResult:
    """Prefill `prompts` (appended to whatever `state` already holds: multi-turn) and decode.

    step_fn: the decode step (default tm.decode_step; pass a torch.compile'd one).
    on_token(row, token): streaming callback, called as tokens are produced (not after a stop).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    step_fn = step_fn or tm.decode_step
    device = state.next_pos.device
    tokens, lengths = pad_prompts(prompts, device)
    budget = state.max_seq_len - int((state.next_pos + lengths).max())
    if max_new_tokens > budget:
        raise ValueError(f"prompt plus max_new_tokens={max_new_tokens} exceeds max_seq_len={state.max_seq_len} "
                         f"(room for {max(budget, 0)} new tokens); shorten the prompt or max_new_tokens")
    stop = torch.tensor(list(stop_tokens) or [-1], device=device)
    result = GenerationResult(tokens=[[] for _ in prompts], stopped=[False] * len(prompts),
                              prompt_tokens=int(lengths.sum()))
    _sync(device)
    t0 = time.perf_counter()
    logits = tm.prefill(model, tokens, state, lengths)
    nxt = sample(logits, sampling, generator)
    _sync(device)
    result.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        host = nxt[:, 0].tolist()
        for row, tok in enumerate(host):
            if not result.stopped[row]:
                result.tokens[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
        done |= torch.isin(nxt[:, 0], stop)
        result.stopped = done.tolist()
        if all(result.stopped) or step == max_new_tokens - 1:
            break
        logits = step_fn(model, nxt, state)
        result.decode_steps += 1
        nxt = sample(logits, sampling, generator)
        state.check_overflow()
    _sync(device)
    result.decode_seconds = time.perf_counter() - t0
    return result


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
