"""The step-time split of the retrofit (config key `timing`, on under `benchmark: true`) and benchmark.json.

A `StepTimer` takes marks through a step: each mark closes the interval since the previous one under its
name. On CUDA a mark records a CUDA event on the current stream (no synchronisation: the GPU's own clock,
read once per step in `end_step`); on CPU it reads time.perf_counter. With timing off the recipe holds a
`NullTimer`, whose marks do nothing.

Marks of one micro-batch (recipes/dms_retrofit.py, dms_flex/retrofit/step.py):

    data                   next batch, copied to the device
    teacher_forward        the teacher (or the student with eviction off), no grad        [eager step only]
    student_forward        the student with DMS                                            [eager step only]
    distillation_forward   chunked KD loss + compression loss                              [eager step only]
    lm_loss_log            the logged-only LM loss                                         [eager step only]
    forward                what remains of the step's forward (all of it when compiled)
    distillation_backward  backward until the gradient of the student's last hidden state  [eager step only]
    backward               the rest of backward: the student's layers (all of it when compiled)
    bookkeeping            kept-token counts of the micro-batch
then per optimizer step: optimizer (clip + step + zero_grad + schedule), report (metrics, logging).

A compiled step (compile=true) is one graph: marks inside it would break it, so it gets the coarse split
(forward_all, backward_all); the fine split comes from an eager run of the same shapes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

# the reported split: group -> the mark names it sums (eager), in the order printed
EAGER_GROUPS = {
    "teacher_forward": ("teacher_forward",),
    "student_forward": ("student_forward",),
    "student_backward": ("backward",),
    "distillation": ("distillation_forward", "distillation_backward"),
    "lm_loss_log": ("lm_loss_log",),
    "optimizer": ("optimizer",),
    "other": ("data", "forward", "bookkeeping", "report"),
}
COMPILED_GROUPS = {
    "forward_all": ("forward",),
    "backward_all": ("backward",),
    "optimizer": ("optimizer",),
    "other": ("data", "bookkeeping", "report"),
}


class NullTimer:
    """Timing off: every call does nothing."""

    enabled = False

    def start_step(self) -> None:
        pass

    def mark(self, name: str) -> None:
        pass

    def mark_on_grad(self, tensor: torch.Tensor, name: str) -> None:
        pass

    def end_step(self, tokens: int, measured: bool) -> None:
        pass


class StepTimer(NullTimer):
    enabled = True

    def __init__(self, device: torch.device, marks: bool = True):
        """marks=False: wall time and tokens per step only (benchmark=true timing=false)."""
        self.marks = marks
        self.cuda = device.type == "cuda"
        self.device = device
        self.steps: List[Dict[str, Any]] = []  # one per ended step: {"ms": {name: ms}, "wall_s", "tokens", "measured"}
        self._marks: List[tuple] = []
        self._t0 = 0.0

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        if self.marks:
            self._marks.append((name, self._now()))

    def mark_on_grad(self, tensor: torch.Tensor, name: str) -> None:
        """Mark `name` when backward reaches `tensor` (its gradient is computed)."""
        if self.marks and tensor.requires_grad:
            tensor.register_hook(lambda grad: self.mark(name))

    def end_step(self, tokens: int, measured: bool) -> None:
        """Close the step: wait for the device, turn the marks into milliseconds per name."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        ms: Dict[str, float] = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            d = a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
            ms[name] = ms.get(name, 0.0) + d
        self.steps.append({"ms": ms, "wall_s": wall, "tokens": int(tokens), "measured": bool(measured)})
        self._marks = []


def split(ms: Dict[str, float]) -> Dict[str, float]:
    """A step's milliseconds per mark name -> per reported group (eager or compiled groups)."""
    groups = EAGER_GROUPS if "teacher_forward" in ms else COMPILED_GROUPS
    out = {g: sum(ms.get(n, 0.0) for n in names) for g, names in groups.items()}
    known = {n for names in groups.values() for n in names}
    out["other"] += sum(v for n, v in ms.items() if n not in known)
    return out


def summary(steps: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean over the measured steps: wall seconds per step, tokens/s of this rank, the split in ms."""
    measured = [s for s in steps if s["measured"]]
    if not measured:
        return {"measured_steps": 0}
    wall = sum(s["wall_s"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    per_step = [split(s["ms"]) for s in measured if s["ms"]]
    mean = {k: sum(p[k] for p in per_step) / len(per_step) for k in per_step[0]} if per_step else None
    kind = None if not per_step else "eager" if "teacher_forward" in measured[0]["ms"] else "compiled"
    return {
        "measured_steps": len(measured),
        "step_s": wall / len(measured),
        "tokens_per_step": tokens / len(measured),
        "tokens_per_s": tokens / wall,
        "split_ms": mean,
        "split_kind": kind,
        "step_s_each": [round(s["wall_s"], 4) for s in steps],
    }


def gather_ranks(values: List[float], device: torch.device, distributed: bool) -> List[List[float]]:
    """[rank][i] of a few floats, on every rank (all_gather)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not distributed:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t)
    return [o.tolist() for o in out]


def peak_memory_values(device: torch.device) -> List[float]:
    """[peak allocated GiB, peak reserved GiB] of this rank (CUDA), or [peak RSS GiB, peak RSS GiB] on CPU."""
    from .memory import peak_memory

    mem = peak_memory(device)
    if device.type == "cuda":
        return [mem["peak_cuda_allocated_GiB"], mem["peak_cuda_reserved_GiB"]]
    return [mem["peak_process_rss_GiB"]] * 2


def finish(
    timer: NullTimer, device: torch.device, distributed: bool, cfg_summary: Dict[str, Any]
) -> Optional[Dict[str, Any]]:
    """After the last step, on every rank together: this rank's summary (the split, when timing), every
    rank's tokens/s, step time and peak memory gathered. Returns benchmark.json's record (rank 0's
    split; tokens/s per GPU: the mean of the ranks'; peak memory: the largest rank's)."""
    own = summary(timer.steps) if timer.enabled else {}
    peaks = peak_memory_values(device)
    rows = gather_ranks([own.get("tokens_per_s", 0.0), own.get("step_s", 0.0), *peaks], device, distributed)
    return {
        "recipe": "dms_retrofit",
        "kind": "benchmark (random or synthetic; not a trained model)",
        **cfg_summary,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_total_GiB": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else None,
        "world_size": len(rows),
        "tokens_per_s_per_gpu": sum(r[0] for r in rows) / len(rows) if timer.enabled else None,
        "step_s": max(r[1] for r in rows) if timer.enabled else None,
        "peak_allocated_GiB": max(r[2] for r in rows),
        "peak_reserved_GiB": max(r[3] for r in rows),
        "rank0": own,
        "ranks": [
            {"tokens_per_s": r[0], "step_s": r[1], "peak_allocated_GiB": r[2], "peak_reserved_GiB": r[3]} for r in rows
        ],
    }


def write_json(path, record: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def make_timer(bench, device: torch.device, step: torch.nn.Module, compiled: bool) -> NullTimer:
    """The recipe's timer: a StepTimer under benchmark=true or timing=true (marks only with timing), else a
    NullTimer. An eager step gets the timer for its inner marks; a compiled one does not (they would break
    its graph: the coarse split)."""
    if not (bench.enabled or bench.timing):
        return NullTimer()
    timer = StepTimer(device, marks=bench.timing)
    step.timer = None if compiled else timer
    return timer


def write_benchmark(timer, device, distributed: bool, cfg_summary: Dict[str, Any], out, log) -> Dict[str, Any]:
    """All ranks: gather (`finish`); rank 0 writes benchmark.json in output_dir (`out`: the recipe's OutputDir,
    which records it as written by the recipe) and logs the headline numbers."""
    record = finish(timer, device, distributed, cfg_summary)
    if not distributed or torch.distributed.get_rank() == 0:
        out.claim("benchmark.json")
        write_json(out.path / "benchmark.json", record)
        split_ms = record["rank0"].get("split_ms") or {}
        log(
            f"benchmark: {record['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, {record['step_s']:.3f} s per step, "
            f"peak reserved {record['peak_reserved_GiB']:.2f} GiB (largest rank); ms per step: "
            + (", ".join(f"{k} {v:.1f}" for k, v in split_ms.items()) or "not split (timing=false)")
            + f"; written to {out.path / 'benchmark.json'}"
        )
    return record
