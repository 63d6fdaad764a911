"""DMS settings and parameters travel with the model through HF-format folders."""

import pytest
import torch

from dms_flex import checkpoints
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig

from .helpers import save_tiny_llama


@pytest.fixture()
def hf_folder(tmp_path):
    pytest.importorskip("transformers")
    save_tiny_llama(tmp_path / "base", vocab_size=96, max_position_embeddings=128)
    return tmp_path


def test_adapter_parameters_and_settings_round_trip(hf_folder):
    dm = checkpoints.load_dms_model(hf_folder / "base", dms_overrides={"decision": "adapter", "window": 3})
    assert not dm.dms_trained
    with torch.no_grad():
        for layer in dm.model.layers:
            layer.attn.dms_adapter.linear.weight.normal_(0, 0.5)
            layer.attn.dms_adapter.norm.weight.uniform_(0.5, 1.5)
    cfg = dict(dm.hf_config, **dm.dms.to_hf())
    extra = checkpoints.dms_state_dict(dm.model)
    assert set(extra) == {
        f"model.layers.{i}.self_attn.dms_adapter.{p}.weight" for i in range(2) for p in ("norm", "linear")
    }
    checkpoints.save_hf_checkpoint(dm.model, cfg, hf_folder / "dms", dm.family, extra_state=extra)

    back = checkpoints.load_dms_model(hf_folder / "dms")
    assert back.dms_trained and back.dms == dm.dms
    for k, v in checkpoints.dms_state_dict(back.model).items():
        assert torch.equal(v, extra[k])
    toks = torch.randint(0, 96, (1, 30))
    a = tm.forward_train(dm.model, toks, training=False)
    b = tm.forward_train(back.model, toks, training=False)
    assert torch.equal(tm.logits_of(dm.model, a.hidden), tm.logits_of(back.model, b.hidden))
    assert any(e.any() for e in b.evicted)  # the loaded adapter really decides evictions


def test_adapter_settings_without_weights_is_a_clear_error(hf_folder):
    dm = checkpoints.load_dms_model(hf_folder / "base")
    cfg = dict(dm.hf_config, **DMSConfig(decision="adapter").to_hf())
    checkpoints.save_hf_checkpoint(dm.model, cfg, hf_folder / "bad", dm.family)
    with pytest.raises(ValueError, match="no DMS adapter weights"):
        checkpoints.load_dms_model(hf_folder / "bad")


def test_torchtune_format_folder_loads_like_the_hf_one(hf_folder):
    """A folder with config.json and one torchtune-named state dict (.pt), DMS adapter included."""
    import json
    import shutil

    dm = checkpoints.load_dms_model(hf_folder / "base", dms_overrides={"decision": "adapter", "window": 2})
    with torch.no_grad():
        for layer in dm.model.layers:
            layer.attn.dms_adapter.linear.weight.normal_(0, 0.5)
    tt = hf_folder / "tune"
    tt.mkdir()
    cfg = dict(dm.hf_config, **dm.dms.to_hf())
    (tt / "config.json").write_text(json.dumps(cfg))
    torch.save({"model": dm.model.state_dict()}, tt / "model_0.pt")
    back = checkpoints.load_dms_model(tt)
    toks = torch.randint(0, 96, (1, 20))
    a = tm.logits_of(dm.model, tm.forward_train(dm.model, toks, training=False).hidden)
    b = tm.logits_of(back.model, tm.forward_train(back.model, toks, training=False).hidden)
    assert torch.equal(a, b)
    (tt / "model_1.pt").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoints.load_dms_model(tt)
    shutil.rmtree(tt)
