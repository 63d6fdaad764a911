"""dms_flex: Dynamic Memory Sparsification (learned KV-cache eviction) for PyTorch."""

from .config import DMSConfig, DMSConfigError
from .generate import GenerationResult, SamplingConfig, generate_tokens, sample
from .torchtune_model import InferenceState, add_dms, decode_step, forward_train, prefill

__version__ = "0.1.0"
__all__ = [
    "DMSConfig",
    "DMSConfigError",
    "add_dms",
    "forward_train",
    "InferenceState",
    "prefill",
    "decode_step",
    "generate_tokens",
    "sample",
    "SamplingConfig",
    "GenerationResult",
]
