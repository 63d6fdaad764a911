"""dms_flex: Dynamic Memory Sparsification (learned KV-cache eviction) for PyTorch."""

from .config import DMSConfig, DMSConfigError
from .sampling import SamplingConfig, sample
from .torchtune_model import InferenceState, add_dms, decode_step, forward_train, layer_capacities, prefill

__version__ = "0.1.0"
__all__ = [
    "DMSConfig",
    "DMSConfigError",
    "add_dms",
    "forward_train",
    "InferenceState",
    "prefill",
    "layer_capacities",
    "decode_step",
    "generate_tokens",
    "sample",
    "SamplingConfig",
    "GenerationResult",
]


def __getattr__(name):
    # the loop lives in the CLI module dms_flex.generate; imported on first use, so that
    # `python -m dms_flex.generate` does not find its own module already imported by the package
    if name in ("generate_tokens", "GenerationResult"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'dms_flex' has no attribute {name!r}")
