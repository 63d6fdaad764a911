"""Helpers the benchmark scripts share: stderr logging and Triton's offline (AOT) sm_90 compile."""

import sys

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
