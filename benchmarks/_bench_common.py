"""Helpers the benchmark scripts share: stderr logging, the git commit of a run, and Triton's offline
(AOT) sm_90 compile."""

import json
import os
import subprocess
import sys
from typing import Optional

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


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
        report["skipped"] = f"triton mock driver unavailable: {e!r}"
        print("@@AOT@@" + json.dumps(report))
        return None
    return report


def git(*cmd) -> Optional[str]:
    """`git CMD` in the repository (None where git or the repository is missing): runs record their commit."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None
