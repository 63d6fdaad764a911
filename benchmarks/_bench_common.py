"""Helpers the benchmark scripts share: stderr logging, the git commit of a run, JSON output, the one
timer (CUDA events on the GPU, the host clock elsewhere), dynamo's recompile limits, and Triton's
offline (AOT) sm_90 compile report."""

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def write_json(path, obj):
    """Write obj as JSON to path through a temporary file (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def rel_err(a, b) -> float:
    """|a - b| / |b| (Frobenius norms, float32)."""
    a = a.detach().float()
    b = b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def raise_recompile_limits(limit: int = 512, accumulated: Optional[int] = 4096):
    """Every (shape, mask) case recompiles flex_attention; dynamo's default limit of 8 recompiles per
    function would silently fall back to eager. accumulated=None leaves the accumulated limits alone."""
    import torch._dynamo

    cfg = torch._dynamo.config
    vals = [("recompile_limit", limit), ("cache_size_limit", limit)]
    if accumulated is not None:
        vals += [("accumulated_recompile_limit", accumulated), ("accumulated_cache_size_limit", accumulated)]
    for name, val in vals:
        if hasattr(cfg, name):
            try:
                setattr(cfg, name, max(getattr(cfg, name), val))
            except Exception:  # noqa: BLE001
                pass


def kernel_bench_device(cpu_smoke: bool):
    """The device of a kernel benchmark's default mode: CUDA, or the CPU under --cpu-smoke; None
    (after saying what to use instead) when there is no CUDA device and no --cpu-smoke."""
    device = torch.device("cuda" if (torch.cuda.is_available() and not cpu_smoke) else "cpu")
    if device.type != "cuda" and not cpu_smoke:
        log("no CUDA device: use --aot (offline compile report) or --cpu-smoke")
        return None
    return device


def add_triton_version(info: dict) -> dict:
    """info["triton"] = Triton's version, where Triton imports."""
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


# ================================================================================ the timer
def kernel_table(events, on_gpu: bool = True, top: int = 15, sequence: int = 48) -> dict:
    """One profiled step's kernels (or CPU ops when not on_gpu) from torch.profiler events: their count and
    summed time, the `top` names by time (name, calls, ms), every name (`all`), and the first `sequence`
    names in launch order (a layer's kernels, in order: what a fusion would merge)."""
    by_name: dict = {}
    for e in events:
        t = e.device_time if on_gpu else e.self_cpu_time_total
        n_t = by_name.setdefault(e.name, [0, 0.0])
        n_t[0], n_t[1] = n_t[0] + 1, n_t[1] + t
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {
        "kernels" if on_gpu else "ops": len(events),
        "summed_ms": sum(t for _, (_, t) in by_name.items()) / 1e3,
        "top": [(name[:160], n, t / 1e3) for name, (n, t) in ranked[:top]],
        "all": [(name[:200], n, t / 1e3) for name, (n, t) in ranked],
        "sequence": [e.name[:200] for e in events[:sequence]],
    }


def call_ms(fn: Callable, device, sync: bool = False) -> float:
    """Milliseconds of one fn() call: CUDA events on CUDA (sync: synchronize the device first), the
    host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sync:
        torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(
    fn: Callable, device, repeats: int, warmup: int, setup: Optional[Callable] = None, sync: bool = True
) -> List[float]:
    """Milliseconds of each of `repeats` calls of fn() after `warmup` calls; setup() runs before each
    call, outside the timed span (call_ms: CUDA events on CUDA, perf_counter elsewhere)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        times.append(call_ms(fn, device, sync))
    return times


def median_ms(fn: Callable, device, repeats: int, sync: bool = False) -> float:
    """Median of `repeats` timed calls (no warm-up)."""
    return statistics.median(time_ms(fn, device, repeats, 0, sync=sync))


# ================================================================================ --aot reports
def install_mock_driver(device_type="cpu"):
    """Make Triton compile for sm_90 on a machine without a GPU (ptxas runs; nothing launches)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver as _drv

    class MockDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def is_active(self):
            return True

        def get_active_torch_device(self):
            return torch.device(device_type)

    _drv.set_active(MockDriver())


def start_aot_report():
    """The --aot report, with Triton's mock sm_90 driver installed; None (after printing the report that
    says why) when Triton cannot be set up here."""
    report = {"kernels": [], "trace": {}}
    try:
        import triton  # noqa: F401

        install_mock_driver("cpu")
    except Exception as e:  # pragma: no cover
        skip_aot(report, f"triton mock driver unavailable: {e!r}")
        return None
    return report


def print_aot(report) -> int:
    """The --aot report as one JSON line prefixed @@AOT@@ (what the tests parse); returns exit code 0."""
    print("@@AOT@@" + json.dumps(report))
    return 0


def skip_aot(report, why: str) -> int:
    report["skipped"] = why
    return print_aot(report)


def make_recorder(compiled: list, keep: Callable = lambda kernel: True):
    """A `wrap=` for the kernels' launch functions: kernel[grid](*a, **kw) compiles offline
    (kernel.warmup) instead of launching, and appends (kernel, grid, kw, compiled kernel, seconds) to
    `compiled`; kernels for which keep(kernel) is false are skipped."""

    class Recorder:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def run(*a, **kw):
                if not keep(self.k):
                    return
                t0 = time.perf_counter()
                ck = self.k.warmup(*a, grid=grid, **kw)
                compiled.append((self.k, grid, kw, ck, time.perf_counter() - t0))

            return run

    return Recorder


def fake_cuda_trace(trace: Callable[[], dict]) -> dict:
    """trace() on fake CUDA tensors (the mock driver says cuda); its dict, or ok=False with the error."""
    try:
        install_mock_driver("cuda")
        return trace()
    except Exception as e:  # noqa: BLE001
        return dict(ok=False, error=repr(e), tb=traceback.format_exc()[-3000:])


def finish_aot(report, describe: Callable[[dict], str]) -> int:
    """Log one line per compiled kernel (describe(row)) and the trace, then print the report."""
    for row in report["kernels"]:
        log(describe(row))
    log("trace:", {k: v for k, v in report["trace"].items() if k != "tb"})
    return print_aot(report)


def git(*cmd) -> Optional[str]:
    """`git CMD` in the repository (None where git or the repository is missing): runs record their commit.

    ``$DMS_FLEX_COMMIT`` overrides ``rev-parse HEAD``: a copied work tree (the lent GPU machines) can carry
    a stale ``.git`` whose HEAD is not the commit that actually ran."""
    if cmd == ("rev-parse", "HEAD") and os.environ.get("DMS_FLEX_COMMIT"):
        return os.environ["DMS_FLEX_COMMIT"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None
