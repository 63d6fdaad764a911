"""Checkpoints: Hugging Face folders as torchtune models, DMS settings and parameters, adapter folders,
and the embedded SmolLM2 model.

- `hf_config`: config.json (reading, architecture, dimensions) and the torchtune decoder it describes;
- `keys`: tensor names between the Hugging Face and torchtune module trees (DMS names included);
- `hf_folder`: loading and saving Hugging Face safetensors folders (`load_hf_checkpoint`,
  `save_hf_checkpoint`), loading DMS extra state;
- `atomic`: atomic folder writes and file modes;
- `pretrained`: `load_dms_model` (base weights + DMS settings + DMS parameters, optionally an adapter);
- `adapter`: DMS adapter folders (`export_adapter`, `read_adapter`);
- `embedded`: the embedded SmolLM2-135M-Instruct (GGUF conversion) and its packaged adapter;
- `paths`: ``$DMS_FLEX_HOME`` and the inter-process file lock.

``python -m dms_flex.checkpoints export-adapter CHECKPOINT OUT [--base BASE]`` writes an adapter folder.
"""

from .adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, check_adapter_fits, export_adapter, read_adapter
from .atomic import TEMP_NAME_RE, make_readable, write_folder_atomically
from .embedded import default_model, default_model_dir, packaged_adapter
from .hf_config import SUPPORTED_ARCHITECTURES, build_decoder, model_family, read_hf_config
from .hf_folder import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    build_expected_hf_shapes,
    load_extra_state,
    load_hf_checkpoint,
    safetensors_errors,
    save_hf_checkpoint,
    weight_files,
)
from .keys import hf_extra_name_to_tune, is_extra_key, tune_extra_name_to_hf
from .paths import dms_flex_home, file_lock
from .pretrained import DMSModel, dms_state_dict, load_dms_model, load_dms_state

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "check_adapter_fits",
    "export_adapter",
    "read_adapter",
    "TEMP_NAME_RE",
    "make_readable",
    "write_folder_atomically",
    "default_model",
    "default_model_dir",
    "packaged_adapter",
    "SUPPORTED_ARCHITECTURES",
    "build_decoder",
    "model_family",
    "read_hf_config",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "LoadedModel",
    "build_expected_hf_shapes",
    "load_extra_state",
    "load_hf_checkpoint",
    "safetensors_errors",
    "save_hf_checkpoint",
    "weight_files",
    "hf_extra_name_to_tune",
    "is_extra_key",
    "tune_extra_name_to_hf",
    "dms_flex_home",
    "file_lock",
    "DMSModel",
    "dms_state_dict",
    "load_dms_model",
    "load_dms_state",
]
