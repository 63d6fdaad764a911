"""Scoring of one method: perplexity and KL(vanilla || method) on held-out text, needle / variable-tracking
retrieval, reasoning accuracy and N-sample majority voting, through the method's cache."""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import generate as generation, stats
from .. import torchtune_model as tm
from ..generate import SamplingConfig
from . import data
from .intervals import mean_interval
from .methods import Method, _device_of
from .reasoning import render_solved


@torch.no_grad()
def perplexity(
    method: Method,
    windows: torch.Tensor,
    vanilla: nn.Module,
    *,
    prefix: int = 32,
    batch_size: int = 4,
    cached: bool = False,
) -> Dict[str, Any]:
    """NLL, perplexity and KL(vanilla || method) per token over windows (N, T), scoring the tokens
    at positions prefix..T-1. Returns the numbers plus the kept-fraction report.

    `vanilla` is the KL reference: always run dense, in its own dtype and weights, with K/V in full
    precision (never int8), so the KL is the method's whole error, quantization included; its forward uses
    the method's attention backend."""
    N, T = windows.shape
    if not (1 <= prefix < T):
        raise ValueError(f"prefix={prefix} must be in [1, {T - 1}]")
    dev = _device_of(method.model)
    teacher = method.name in ("vanilla", "dms") and not cached
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    kept: List[List[torch.Tensor]] = []  # per batch: per layer (B, H)
    live_slots = 0.0  # (window, layer, KV head) slots held once each window's last input token is read
    window = method.dms_config.effective_window if method.dms_config is not None else None
    t0 = time.perf_counter()
    for i in range(0, N, batch_size):
        x = windows[i : i + batch_size].to(dev)
        B = x.shape[0]
        # the last token is only a target: the forwards read x[:, :-1], as the cached path does
        ref = tm.logits_of(
            vanilla,
            tm.forward_train(vanilla, x[:, :-1], eviction=False, training=False, backend=method.attention).hidden,
        )
        ref = F.log_softmax(ref[:, prefix - 1 :].float(), dim=-1)
        if teacher:
            logits, evicted = method.teacher_forced(x[:, :-1])
            logits = logits[:, prefix - 1 :]
            if method.name == "dms":
                fractions = [stats.kept_fraction(ev, window) for ev in evicted]  # per layer (B, H), of T - 1
                live_slots += (T - 1) * sum(float(f.sum()) for f in fractions)
                kept.append(fractions)
            else:
                kept.append([torch.ones(B, 1)])
                live_slots += (T - 1) * B * len(method.model.layers) * _kv_heads(method)
        else:
            state = method.new_state(B, T)
            steps = [method.prefill(x[:, :prefix], state)]
            for t in range(prefix, T - 1):
                steps.append(method.step(x[:, t : t + 1], state))
            logits = torch.stack(steps, dim=1)
            seen = state.next_pos.clamp_min(1)[:, None].float()
            kept.append([c.length.float() / seen for c in state.caches])
            live_slots += sum(float(c.length.sum()) for c in state.caches)
        lp = F.log_softmax(logits.float(), dim=-1)
        target = x[:, prefix:]
        nll_sum += float(-lp.gather(-1, target[..., None]).sum())
        kl_sum += float((ref.exp() * (ref - lp)).sum())
        count += target.numel()
    report = stats.compression_report([torch.cat([k[layer].cpu() for k in kept]) for layer in range(len(kept[0]))])
    nll = nll_sum / count
    seen_slots = N * (T - 1) * len(method.model.layers) * _kv_heads(method)
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "kl": kl_sum / count,
        "tokens": count,
        "cr": report.ratio,
        "cr_slots": seen_slots / max(live_slots, 1e-12),
        "kv_live_bytes": live_slots * slot_bytes(method),
        "sequences": N,
        "path": "teacher-forced" if teacher else f"cached (prefill {prefix}, then token by token)",
        "kept_per_layer_head": [[round(float(v), 4) for v in row] for row in report.per_layer_head],
        "seconds": time.perf_counter() - t0,
        "report": report,
    }


@torch.no_grad()
def generate_rows(
    method: Method,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_tokens: Sequence[int] = (),
    sampling: SamplingConfig = SamplingConfig(),
    generator: Optional[torch.Generator] = None,
):
    """Prefill the (ragged) prompts and decode; returns (new tokens per row, the final state)."""
    dev = _device_of(method.model)
    tokens, lengths = generation.pad_prompts(prompts, dev)
    state = method.new_state(len(prompts), int(lengths.max()) + max_new_tokens)
    logits = method.prefill(tokens, state, lengths)
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stop = set(stop_tokens)
    for step in range(max_new_tokens):
        nxt = generation.sample(logits, sampling, generator)
        for r, t in enumerate(nxt[:, 0].tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t in stop
        if all(done) or step == max_new_tokens - 1:
            break
        logits = method.step(nxt, state)
    return out, state


def _kv_heads(method: Method) -> int:
    return int(method.model.layers[0].attn.num_kv_heads)


def slot_bytes(method: Method) -> int:
    """K and V bytes of one (sequence, layer, KV head, token) slot as the method's cache stores it: two
    head_dim vectors in the model dtype, or int8 with one float32 scale each (`cache.SlotStore.bytes_per_slot`)."""
    attn = method.model.layers[0].attn
    if method.int8_kv:
        return 2 * (attn.head_dim + 4)
    return 2 * attn.head_dim * next(method.model.parameters()).element_size()


def _state_numbers(states) -> Dict[str, float]:
    """The caches' numbers once the last token was read: CR (1 / mean kept fraction, docs/design.md), the
    token-weighted CR (tokens seen / slots held, over every layer and KV head: what equal memory matches on
    inputs of unequal lengths), live and dense KV bytes, and the sequences they hold."""
    live = sum(s.kv_bytes()["live"] for s in states)
    dense = sum(s.kv_bytes()["dense"] for s in states)
    kept = torch.cat([s.compression().per_layer_head.mean()[None] for s in states]).mean()
    slots = sum(float(c.length.sum()) for s in states for c in s.caches)
    seen = sum(float(s.next_pos.sum()) * len(s.caches) * s.caches[0].k.shape[1] for s in states)
    return {
        "cr": 1.0 / max(float(kept), 1e-12),
        "cr_slots": seen / max(slots, 1e-12),
        "kv_live_bytes": live,
        "kv_dense_bytes": dense,
        "sequences": sum(s.batch_size for s in states),
    }


def _batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def probe_accuracy(
    method: Method, items: Sequence[data.ProbeItem], decode, batch_size: int = 8, stop_tokens: Sequence[int] = ()
) -> Dict[str, Any]:
    """Needle / variable-tracking accuracy, overall and per (length, depth)."""
    scores, states, samples = [], [], []
    by_len: Dict[int, List[data.ProbeItem]] = collections.defaultdict(list)
    for it in items:
        by_len[it.length].append(it)
    for length in sorted(by_len):
        for chunk in _batches(by_len[length], batch_size):
            outs, state = generate_rows(
                method, [it.prompt for it in chunk], chunk[0].max_new_tokens, stop_tokens=stop_tokens
            )
            states.append(state)
            for it, o in zip(chunk, outs):
                text = decode(o)
                s = data.score_probe(it, text)
                scores.append((it.length, it.depth, s))
                if len(samples) < 4:
                    samples.append({"length": it.length, "depth": it.depth, "answer": it.answer, "output": text})
    grid: Dict[str, float] = {}
    for L, d in sorted({(L, d) for L, d, _ in scores}):
        vals = [s for L2, d2, s in scores if (L2, d2) == (L, d)]
        grid[f"len{L}_depth{d:g}"] = sum(vals) / len(vals)
    return {
        "accuracy": sum(s for *_, s in scores) / max(len(scores), 1),
        "n": len(scores),
        "scores": [s for *_, s in scores],  # per item, in the order of `items` (length by length)
        "interval": mean_interval([s for *_, s in scores]) if scores else None,
        "by_length_depth": grid,
        **_state_numbers(states),
        "samples": samples,
    }


def reasoning_accuracy(
    method: Method,
    items: Sequence[data.ReasoningItem],
    render,
    decode,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    stop_tokens: Sequence[int] = (),
) -> Dict[str, Any]:
    """Greedy answers scored by reasoning-gym's score_answer; per task and overall."""
    per_task: Dict[str, List[float]] = collections.defaultdict(list)
    states, samples, allv = [], [], []
    prompts = [render(it) for it in items]
    for i, chunk in enumerate(_batches(list(items), batch_size)):
        rows = prompts[i * batch_size : (i + 1) * batch_size]
        outs, state = generate_rows(method, rows, max_new_tokens, stop_tokens=stop_tokens)
        states.append(state)
        for it, o in zip(chunk, outs):
            text = decode(o)
            ans = data.extract_answer(text)
            per_task[it.task].append(it.score(ans))
            allv.append(per_task[it.task][-1])
            if len(samples) < 4:
                samples.append({"question": it.question, "expected": it.entry["answer"], "output": text})
    prompt_tokens = [len(p) for p in prompts]
    return {
        "accuracy": sum(allv) / max(len(allv), 1),
        "n": len(allv),
        "scores": allv,  # per item, in the order of `items`
        "interval": mean_interval(allv) if allv else None,
        "prompt_tokens": {"min": min(prompt_tokens, default=0), "max": max(prompt_tokens, default=0)},
        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
        **_state_numbers(states),
        "samples": samples,
    }


def render_reasoning(tok, item: data.ReasoningItem) -> List[int]:
    """The item's solved examples as earlier chat turns, then its question (plain Q/A text without a
    chat template): `dms_flex.eval.reasoning.render_solved`."""
    return render_solved(tok, item.shots, item.question)


def majority_vote(answers: Sequence[str]) -> str:
    """The most common normalised answer (ties: the one seen first)."""
    norm = [a.strip().lower() for a in answers]
    counts = collections.Counter(n for n in norm if n)
    if not counts:
        return answers[0] if answers else ""
    best = max(counts.values())
    for a, n in zip(answers, norm):
        if counts.get(n) == best:
            return a
    return answers[0]


def parallel_sampling(
    method: Method,
    items: Sequence[data.ReasoningItem],
    render,
    decode,
    n_samples: int,
    *,
    max_new_tokens: int = 24,
    sampling: SamplingConfig,
    seed: int = 0,
    questions_per_batch: int = 4,
    stop_tokens: Sequence[int] = (),
) -> Dict[str, Any]:
    """n_samples answers per question (one batch row each), majority vote, scored like reasoning."""
    gen = torch.Generator(device=_device_of(method.model)).manual_seed(seed)
    voted, each, states = [], [], []
    for chunk in _batches(list(items), questions_per_batch):
        prompts = [render(it) for it in chunk for _ in range(n_samples)]
        outs, state = generate_rows(
            method, prompts, max_new_tokens, stop_tokens=stop_tokens, sampling=sampling, generator=gen
        )
        states.append(state)
        for q, it in enumerate(chunk):
            answers = [data.extract_answer(decode(o)) for o in outs[q * n_samples : (q + 1) * n_samples]]
            each += [it.score(a) for a in answers]
            voted.append(it.score(majority_vote(answers)))
    nums = _state_numbers(states)
    return {
        "samples_per_question": n_samples,
        "accuracy_vote": sum(voted) / len(voted),
        "accuracy_per_sample": sum(each) / len(each),
        "n": len(voted),
        "kv_live_bytes_per_question": nums["kv_live_bytes"] / len(voted),
        "cr": nums["cr"],
    }
