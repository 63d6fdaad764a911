"""dms_flex.checkpoints: Hugging Face folders <-> torchtune decoders, checked against transformers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dms_flex.checkpoints as ckpt
from dms_flex.checkpoints import (
    LoadedModel,
    hf_extra_name_to_tune,
    load_hf_checkpoint,
    save_hf_checkpoint,
    tune_extra_name_to_hf,
)

from .helpers import CASES, TINY, make_hf
from .helpers import tiny_tokenizer as _tiny_tokenizer


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def tune_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 20))


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "llama"
    make_hf("llama_untied").save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# logits match transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path, tokens):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / case)
    loaded = load_hf_checkpoint(tmp_path / case)
    assert isinstance(loaded, LoadedModel)
    assert loaded.family == case.split("_")[0]
    assert loaded.max_seq_len == TINY["max_position_embeddings"]
    assert loaded.tokenizer is None and loaded.extra_state == {}
    assert loaded.hf_config["architectures"] == [type(hf).__name__]
    from torchtune.modules import TiedLinear, TransformerDecoder

    assert isinstance(loaded.model, TransformerDecoder)
    assert isinstance(loaded.model.output, TiedLinear) == ("_tied" in case)
    ref = hf_logits(hf, tokens)
    out = tune_logits(loaded.model, tokens)
    assert out.dtype == torch.float32
    assert ref.abs().max() > 1.0  # the comparison below is not trivially small
    assert (out - ref).abs().max().item() < 1e-4


def test_builder_choice(tmp_path):
    """The Llama variants use the builders the module docstring promises (via their RoPE class)."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
    from torchtune.modules import RotaryPositionalEmbeddings

    expect = {
        "llama_untied": (RotaryPositionalEmbeddings, None),
        "llama_tied": (Llama3ScaledRoPE, 1.0),
        "llama_rope_llama3": (Llama3ScaledRoPE, 8.0),
        "qwen2_untied": (Qwen2RotaryPositionalEmbeddings, None),
    }
    for case, (rope_cls, scale) in expect.items():
        cfg_cls, _, kw = CASES[case]
        cfg = cfg_cls(**{**TINY, **kw}).to_dict()
        cfg["architectures"] = [CASES[case][1].__name__]
        model = ckpt.build_decoder(cfg)
        rope = model.layers[0].attn.pos_embeddings
        assert type(rope) is rope_cls, case
        if scale is not None:
            assert rope.scale_factor == scale


def test_llama3_rope_scaling_is_exercised(tmp_path, tokens):
    """Dropping the llama3 rope settings changes the logits far beyond the tolerance, so the
    match above really checks the scaled RoPE (factor and the three band parameters)."""
    hf = make_hf("llama_rope_llama3")
    hf.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    ref = hf_logits(hf, tokens)
    for change in (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        {"rope_parameters": {**cfg["rope_parameters"], "original_max_position_embeddings": 8192}},
    ):
        (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, **change}))
        wrong = tune_logits(load_hf_checkpoint(tmp_path / "a").model, tokens)
        assert (wrong - ref).abs().max().item() > 1e-2


def test_legacy_rope_scaling_keys(tmp_path, tokens):
    """Configs written before transformers 5 carry rope_theta + rope_scaling instead of rope_parameters."""
    hf = make_hf("llama_rope_llama3")
    hf.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    path.write_text(json.dumps(cfg))
    out = tune_logits(load_hf_checkpoint(tmp_path / "m").model, tokens)
    assert (out - hf_logits(hf, tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize("head_dim,base", [(16, 10_000.0), (64, 100_000.0), (128, 500_000.0)])
def test_llama3_scaled_rope_with_scale_1_equals_plain_rope(head_dim, base):
    """Tied Llama configs without rope scaling go through llama3_2's Llama3ScaledRoPE with
    scale_factor=1, which must equal torchtune's plain RotaryPositionalEmbeddings."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.modules import RotaryPositionalEmbeddings

    scaled = Llama3ScaledRoPE(dim=head_dim, max_seq_len=4096, base=base, scale_factor=1)
    plain = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=4096, base=base)
    torch.testing.assert_close(scaled.theta, plain.theta, rtol=1e-7, atol=0)
    torch.testing.assert_close(scaled.cache, plain.cache, rtol=0, atol=1e-6)
    x = torch.randn(1, 4096, 2, head_dim)
    torch.testing.assert_close(scaled(x), plain(x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune's fp32 RMSNorm
def test_dtype_and_max_seq_len(llama_dir, tokens):
    loaded = load_hf_checkpoint(llama_dir, dtype=torch.bfloat16, max_seq_len=32)
    assert loaded.max_seq_len == 32 and loaded.model.max_seq_len == 32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    out = tune_logits(loaded.model, tokens)
    ref = tune_logits(load_hf_checkpoint(llama_dir).model, tokens)
    assert out.dtype == torch.float32  # torchtune's decoder upcasts its logits
    assert (out - ref).abs().max().item() < 0.25


def test_sharded_checkpoint(tmp_path, tokens):
    hf = make_hf("llama_untied")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files
    assert sum(f.startswith("model-") for f in files) > 1
    out = tune_logits(load_hf_checkpoint(tmp_path / "sharded").model, tokens)
    assert (out - hf_logits(hf, tokens)).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------
# extra (DMS) tensors, round trip, tokenizer
# ------------------------------------------------------------------------------------------------


def _add_tensors(folder, extra):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state.update(extra)
    save_file(state, str(path), metadata={"format": "pt"})


def test_dms_tensors_become_extra_state(llama_dir, tokens):
    extra = {
        "model.layers.0.self_attn.dms_adapter.linear.weight": torch.randn(2, 64),
        "model.layers.1.self_attn.dms_adapter.linear.bias": torch.randn(2).to(torch.bfloat16),
    }
    _add_tensors(llama_dir, extra)
    loaded = load_hf_checkpoint(llama_dir)
    assert loaded.extra_state.keys() == extra.keys()
    for k, v in extra.items():
        assert torch.equal(loaded.extra_state[k], v) and loaded.extra_state[k].dtype == v.dtype


def test_extra_name_translation():
    hf = "model.layers.0.self_attn.dms_adapter.linear.weight"
    tune = "layers.0.attn.dms_adapter.linear.weight"
    assert hf_extra_name_to_tune(hf) == tune
    assert tune_extra_name_to_hf(tune) == hf
    for name in ("model.layers.12.mlp.dms_gate", "model.layers.3.dms_scale", "model.norm.dms_x"):
        assert tune_extra_name_to_hf(hf_extra_name_to_tune(name)) == name


@pytest.mark.parametrize("case", ["llama_untied", "llama_tied", "llama_rope_llama3", "qwen2_tied", "qwen2_untied"])
def test_round_trip(case, tmp_path, tokens):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "src")
    extra = {"model.layers.1.self_attn.dms_adapter.linear.weight": torch.randn(2, 64)}
    _add_tensors(tmp_path / "src", extra)
    first = load_hf_checkpoint(tmp_path / "src")
    out = save_hf_checkpoint(
        first.model, first.hf_config, tmp_path / "dst", first.family, extra_state=first.extra_state
    )
    assert out == (tmp_path / "dst").absolute()
    assert sorted(os.listdir(tmp_path / "dst")) == ["config.json", "model.safetensors"]
    second = load_hf_checkpoint(tmp_path / "dst")
    a, b = tune_logits(first.model, tokens), tune_logits(second.model, tokens)
    assert torch.equal(a, b)
    assert torch.equal(second.extra_state[next(iter(extra))], next(iter(extra.values())))
    saved = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert ("lm_head.weight" in saved) == ("untied" in case or case == "llama_rope_llama3")
    # transformers reads what we wrote (it reports the dms tensor as unexpected and ignores it)
    reread = type(hf).from_pretrained(tmp_path / "dst").eval()
    assert (hf_logits(reread, tokens) - hf_logits(hf, tokens)).abs().max().item() < 1e-6


def test_save_maps_dms_modules_of_the_model(llama_dir, tmp_path, tokens):
    loaded = load_hf_checkpoint(llama_dir)
    loaded.model.layers[0].attn.dms_adapter = torch.nn.Linear(64, 2)
    save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "out", "llama")
    again = load_hf_checkpoint(tmp_path / "out")
    w = again.extra_state["model.layers.0.self_attn.dms_adapter.weight"]
    assert torch.equal(w, loaded.model.layers[0].attn.dms_adapter.weight)


def test_tokenizer_loaded_saved_and_carried_over(llama_dir, tmp_path):
    _tiny_tokenizer().save_pretrained(llama_dir)
    loaded = load_hf_checkpoint(llama_dir)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("hello world")["input_ids"] == [1, 2]
    save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "with_tok", "llama", tokenizer=loaded.tokenizer)
    assert load_hf_checkpoint(tmp_path / "with_tok").tokenizer("world hello")["input_ids"] == [2, 1]
    # saving over the source folder without a tokenizer keeps its tokenizer and generation config
    save_hf_checkpoint(loaded.model, loaded.hf_config, llama_dir, "llama")
    assert (llama_dir / "generation_config.json").exists()
    assert load_hf_checkpoint(llama_dir).tokenizer("hello")["input_ids"] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old leftovers


# ------------------------------------------------------------------------------------------------
# atomic save
# ------------------------------------------------------------------------------------------------


def test_interrupted_save_leaves_previous_folder_intact(llama_dir, tmp_path, monkeypatch, tokens):
    loaded = load_hf_checkpoint(llama_dir)
    before = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        loaded.model.norm.scale.mul_(2.0)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(loaded.model, loaded.hf_config, llama_dir, "llama")
    assert {p.name: p.read_bytes() for p in llama_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # temp folder removed
    with pytest.raises(KeyboardInterrupt):  # a new folder is not created half-way either
        save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "new", "llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_save_refuses_to_replace_a_non_checkpoint_folder(llama_dir, tmp_path):
    loaded = load_hf_checkpoint(llama_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_hf_checkpoint(loaded.model, loaded.hf_config, other, "llama")
    assert (other / "todo.txt").read_text() == "keep me"


def test_save_errors(llama_dir, tmp_path):
    loaded = load_hf_checkpoint(llama_dir)
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="does not match hf_config"):
        save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "x", "qwen2")
    with pytest.raises(ValueError, match="tied to its embeddings but hf_config says tie_word_embeddings=false"):
        tied = load_hf_checkpoint(_saved(make_hf("llama_tied"), tmp_path / "tied"))
        save_hf_checkpoint(tied.model, {**tied.hf_config, "tie_word_embeddings": False}, tmp_path / "x", "llama")
    with pytest.raises(ValueError, match="shape mismatch .* hf_config implies"):
        save_hf_checkpoint(loaded.model, {**loaded.hf_config, "intermediate_size": 128}, tmp_path / "x", "llama")
    loaded.model.layers[0].attn.extra_proj = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cannot hold .*extra_proj"):
        save_hf_checkpoint(loaded.model, loaded.hf_config, tmp_path / "x", "llama")
    assert not (tmp_path / "x").exists()


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# load errors a user can cause
# ------------------------------------------------------------------------------------------------


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in .*save_pretrained"):
        load_hf_checkpoint(tmp_path / "empty")


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(
        ValueError,
        match="unsupported architecture.*GPT2LMHeadModel.*supported "
        "architectures are LlamaForCausalLM, Qwen2ForCausalLM",
    ):
        load_hf_checkpoint(llama_dir)


def test_unsupported_settings(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'.*supported: default, llama3"):
        load_hf_checkpoint(llama_dir)
    _edit_config(llama_dir, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, head_dim=32)
    with pytest.raises(ValueError, match="head_dim 32 differs"):
        load_hf_checkpoint(llama_dir)
    _edit_config(llama_dir, head_dim=16, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        load_hf_checkpoint(llama_dir)


def test_missing_weights(llama_dir):
    # a lone .bin is read as a PyTorch state dict; this one is not one (it is safetensors bytes)
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a PyTorch state dict"):
        load_hf_checkpoint(llama_dir)
    (llama_dir / "pytorch_model.bin").rename(llama_dir / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no weights in .*expected model.safetensors"):
        load_hf_checkpoint(llama_dir)


def test_missing_shard(tmp_path):
    make_hf("llama_untied").save_pretrained(tmp_path / "s", max_shard_size="40KB")
    shard = sorted(p for p in (tmp_path / "s").iterdir() if p.name.startswith("model-"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {shard.name}"):
        load_hf_checkpoint(tmp_path / "s")


def test_shape_mismatch(llama_dir):
    _edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for model.layers.0.mlp.down_proj.weight: "
        r"the weights file has \(64, 96\), config.json implies \(64, 128\)",
    ):
        load_hf_checkpoint(llama_dir)


def test_missing_and_unexpected_tensors(llama_dir):
    state = load_file(str(llama_dir / "model.safetensors"))
    w = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_hf_checkpoint(llama_dir)
    state["model.layers.1.mlp.up_proj.weight"] = w
    state["model.layers.1.mlp.extra.weight"] = w.clone()
    save_file(state, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not have: model.layers.1.mlp.extra.weight"):
        load_hf_checkpoint(llama_dir)


def test_wrong_layer_count(llama_dir):
    _edit_config(llama_dir, num_hidden_layers=3)
    with pytest.raises(ValueError, match="lack 9 tensor.*model.layers.2"):
        load_hf_checkpoint(llama_dir)
