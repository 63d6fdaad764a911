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


@dataclass
class PendingTokens:
    """What a generate_tokens call leaves for the next one on the same state: each row's last sampled
    token, returned but not yet in the cache (None when the cache holds all of the row's tokens), and
    the tokens the batch decoded into a row's cache after that row had stopped (filler)."""

    tokens: List[Optional[int]]
    filler: List[int]
    next_pos: torch.Tensor  # state.next_pos when they were left: a state moved on since cannot take them


def _take_pending(state: tm.InferenceState, prompts: Sequence[Sequence[int]]) -> List[List[int]]:
    """The prompts with each row's pending token first (see PendingTokens); ValueError when the state
    cannot continue every row's transcript exactly."""
    pending = getattr(state, "pending", None)
    if pending is None:
        return [list(p) for p in prompts]
    if not torch.equal(pending.next_pos, state.next_pos):
        raise ValueError("the state moved on (prefill/decode_step called directly) since generate_tokens left each "
                         "row's last sampled token unwritten; continue through generate_tokens only, or reset() the "
                         "state and prefill the whole transcript")
    stuck = [r for r, n in enumerate(pending.filler) if n]
    if stuck:
        raise ValueError(f"row(s) {stuck} stopped before the rest of their batch: their caches hold "
                         f"{[pending.filler[r] for r in stuck]} token(s) decoded after the stop token, so a "
                         f"continuation would not match their transcripts; continue conversations that stop at "
                         f"different steps in separate states, or reset() the state and prefill the transcripts")
    if len(prompts) != len(pending.tokens):
        raise ValueError(f"{len(prompts)} prompt(s) for a state of batch {len(pending.tokens)}")
    return [([t] if t is not None else []) + list(p) for t, p in zip(pending.tokens, prompts)]


@torch.no_grad()
def generate_tokens(model, prompts: Sequence[Sequence[int]], state: tm.InferenceState, *, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
                    step_fn: Optional[Callable] = None, on_token: Optional[Callable[[int, int], None]] = None,
                    generator: Optional[torch.Generator] = None, compile_prefill: bool = False) -> GenerationResult:
    """Prefill `prompts` (appended to whatever `state` already holds) and decode.

    Multi-turn: call it again on the same state with the next turn's tokens; the conversation then
    equals one teacher-forced pass over the whole transcript (prompts and returned tokens, in order).
    The last token a call returns for a row is sampled but not yet decoded; the state keeps it
    (`state.pending`) and the next call feeds it first, so a later prompt may be empty (continue the
    answer). A row that stops (stop token) before the rest of its batch keeps receiving filler
    tokens, so its state cannot continue: the next call refuses it (use one state per conversation,
    or reset() and prefill). `state.reset()` drops what is pending.

    step_fn: the decode step (default tm.decode_step; pass a torch.compile'd one).
    compile_prefill: on CUDA, prefill's per-layer work around attention runs compiled (tm.prefill).
    on_token(row, token): streaming callback, called as tokens are produced (not after a stop).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    step_fn = step_fn or tm.decode_step
    device = state.next_pos.device
    prompts = _take_pending(state, prompts)
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
    logits = tm.prefill(model, tokens, state, lengths, compile=compile_prefill)
    state.pending = None  # written now
    nxt = sample(logits, sampling, generator)
    _sync(device)
    result.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    written = [0] * len(prompts)  # returned tokens of each row that are in the cache
    filler = [0] * len(prompts)  # tokens decoded into a row's cache after it stopped
    B = len(prompts)
    no_overflow = torch.zeros(1, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        # one device-to-host transfer per step: the tokens, the stop flags and the caches' overflow flag
        done |= torch.isin(nxt[:, 0], stop)
        overflow = state.overflow_flag().long().reshape(1) if step else no_overflow
        host = torch.cat([nxt[:, 0], done.long(), overflow]).tolist()
        if host[-1]:
            state.check_overflow()  # raises with the cache's message, before a token computed past it is returned
        returned = [not s for s in result.stopped]  # this step's token of the row is part of its result
        for row, tok in enumerate(host[:B]):
            if returned[row]:
                result.tokens[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
        result.stopped = [bool(d) for d in host[B:2 * B]]
        if all(result.stopped) or step == max_new_tokens - 1:
            break
        logits = step_fn(model, nxt, state)
        for row in range(len(prompts)):
            if returned[row]:
                written[row] += 1
            else:
                filler[row] += 1
        result.decode_steps += 1
        nxt = sample(logits, sampling, generator)
    state.pending = PendingTokens(
        tokens=[toks[-1] if len(toks) > n else None for toks, n in zip(result.tokens, written)],
        filler=filler, next_pos=state.next_pos.clone())
    _sync(device)
    result.decode_seconds = time.perf_counter() - t0
    return result


# the loop under its first name (`dms_flex.generate` is the command-line module, so the package
# exports this function as generate_tokens only)
generate = generate_tokens


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
