"""What the recipe measures and logs: kept tokens per layer and KV head (the achieved CR), the metrics
of a step, and the kept-fraction heat map."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dms_flex.stats import CompressionReport, kept_fraction, plot_kept_heatmap

from .memory import peak_memory


def kept_tokens(
    evicted: List[torch.Tensor], doc_ids: torch.Tensor, valid: torch.Tensor, window: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, Hkv) tokens a cache would still hold at the end of each document, summed over the
    documents of the batch, and the number of tokens seen. Each packed document is its own sequence
    (stats.kept_fraction per document), so CR = total / kept."""
    B, T = doc_ids.shape
    spans = []  # (row, start, length) of every real document
    ids, ok = doc_ids.cpu(), valid.cpu()
    for b in range(B):
        change = torch.nonzero(ids[b, 1:] != ids[b, :-1]).flatten().add(1).tolist()
        for s, e in zip([0] + change, change + [T]):
            if bool(ok[b, s]):
                spans.append((b, s, e - s))
    n = torch.tensor([L for _, _, L in spans], device=doc_ids.device)
    width = int(n.max())
    offs = torch.arange(width)
    index = torch.stack([b * T + s + offs.clamp(max=L - 1) for b, s, L in spans]).to(doc_ids.device)
    kept = []
    for ev in evicted:  # (B, H, T) -> one row per document
        H = ev.shape[1]
        per_doc = ev.permute(1, 0, 2).reshape(H, B * T)[:, index].permute(1, 0, 2)
        kept.append((kept_fraction(per_doc, window, n) * n[:, None]).sum(0))
    return torch.stack(kept).float(), n.sum().float()


def reduce_step(sums: torch.Tensor, kept: torch.Tensor, seen: torch.Tensor, tokens: int, distributed: bool):
    """(kd, compression, lm, CompressionReport, tokens) of an optimizer step over all ranks: the mean
    losses (`sums`: this rank's, already divided by the micro-batches), kept / seen summed, tokens summed."""
    stats = torch.cat([sums, kept.flatten(), seen.view(1), torch.tensor([float(tokens)], device=sums.device)])
    if distributed:
        torch.distributed.all_reduce(stats)
        stats[:3] /= torch.distributed.get_world_size()
    kd, comp, lm = stats[:3].tolist()
    report = CompressionReport(per_layer_head=(stats[3:-2].view_as(kept) / stats[-2]).cpu())
    return kd, comp, lm, report, stats[-1].item()


def describe_run(n_all: int, n_train: int, dms, lora, zeroing_steps: int, teacher_copy: bool, where: str) -> str:
    """The start-up line: parameters, DMS settings and schedule, the teacher, ranks and device."""
    lora_text = f", LoRA rank {lora.rank} on {'/'.join(lora.modules)}" if lora else ""
    phase1 = f"{zeroing_steps} steps zeroing the borrowed channel, then " if zeroing_steps else ""
    teacher = "the student with eviction off" + (" and LoRA disabled" if lora else "")
    teacher = "frozen copy of the original" if teacher_copy else teacher
    return (
        f"student: {n_all:,} parameters ({n_train:,} trained), DMS {dms.decision} window {dms.window}"
        f"{lora_text}; {phase1}CR {dms.initial_cr:g} -> {dms.final_cr:g} over {dms.final_step} steps; "
        f"teacher: {teacher}; {where}"
    )


def step_metrics(
    kd: float,
    comp: float,
    lm: float,
    *,
    target_cr: float,
    report: CompressionReport,
    lr: float,
    tokens_per_second: float,
    grad_norm: Optional[torch.Tensor],
    device: torch.device,
) -> Dict[str, float]:
    """The metrics logged for a training step: losses, target and achieved CR, learning rate,
    throughput, gradient norm (when clipped), measured peak memory, kept fraction per layer."""
    log = {
        "loss": kd + comp,
        "kd_loss": kd,
        "compression_loss": comp,
        "lm_loss": lm,
        "target_cr": target_cr,
        "achieved_cr": report.ratio,
        "lr": lr,
        "tokens_per_second": tokens_per_second,
    }
    if grad_norm is not None:
        log["grad_norm"] = float(grad_norm)
    log.update(peak_memory(device))
    log.update({f"kept_layer_{i:02d}": float(v) for i, v in enumerate(report.per_layer_head.mean(dim=1))})
    return log


def save_heatmap(
    report: CompressionReport, output_dir: Path, step: int, claim: Callable[[str], None], log: Callable[[str], None]
) -> None:
    """kept_heatmap.png in output_dir: kept fraction per layer and KV head (needs matplotlib)."""
    try:
        claim("kept_heatmap.png")
        path = plot_kept_heatmap(report, str(output_dir / "kept_heatmap.png"), title=f"kept, step {step}")
        log(f"heat map of kept fraction per layer and KV head: {path}")
    except ImportError:
        log("no heat map: it needs matplotlib (pip install matplotlib)")
