"""Exported DMS adapters: an adapter-only retrofit travels as dms_adapter.safetensors + dms_config.json,
and the base model plus the adapter is exactly the full retrofit checkpoint."""

import fnmatch
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dms_flex import checkpoints
from dms_flex.checkpoints import __main__ as cli
from dms_flex.checkpoints import embedded as smollm2
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig

from .helpers import TINY, make_hf, tiny_tokenizer

WINDOW = 3
LINEAR = "model.layers.0.self_attn.dms_adapter.linear.weight"


def _retrofit(root: Path, case: str, base_dtype=torch.float32) -> dict:
    """base/: a tiny random HF model (with a tokenizer); full/: the adapter-variant retrofit of it that
    the recipe would save with train_adapter_only=true (same base weights, random non-zero adapter)."""
    hf = make_hf(case)
    hf.to(base_dtype).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    dm = checkpoints.load_dms_model(
        root / "base", dms_overrides={"decision": "adapter", "window": WINDOW, "final_cr": 3.0}
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in dm.model.layers:
            a = layer.attn.dms_adapter
            a.linear.weight.copy_(0.05 * torch.randn(a.linear.weight.shape, generator=g))
            a.norm.weight.copy_(torch.rand(a.norm.weight.shape, generator=g) + 0.5)
    cfg = dict(dm.hf_config, **dm.dms.to_hf())
    # the recipe saves the base in save_dtype and the DMS parameters in float32
    weights = {k: v if checkpoints.is_extra_key(k) else v.to(base_dtype) for k, v in dm.model.state_dict().items()}
    view = _View(weights)
    checkpoints.save_hf_checkpoint(
        view, cfg, root / "full", dm.family, extra_state=checkpoints.dms_state_dict(view), tokenizer=dm.tokenizer
    )
    return {"base": root / "base", "full": root / "full", "family": dm.family}


class _View:
    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


@pytest.fixture(scope="module", params=["llama_untied", "qwen2_tied"])
def run(request, tmp_path_factory):
    torch.manual_seed(0)
    return _retrofit(tmp_path_factory.mktemp(request.param), request.param)


def _logits(model, tokens):
    out = tm.forward_train(model, tokens, training=False)  # eviction on, hard decisions
    return tm.logits_of(model, out.hidden), out.evicted


def test_base_plus_adapter_is_the_full_checkpoint(run, tmp_path):
    out = checkpoints.export_adapter(run["full"], tmp_path / "adapter", base_folder=run["base"])
    assert sorted(p.name for p in out.iterdir()) == ["dms_adapter.safetensors", "dms_config.json"]
    saved = load_file(str(out / "dms_adapter.safetensors"))
    n_layers = TINY["num_hidden_layers"]
    assert set(saved) == {
        f"model.layers.{i}.self_attn.dms_adapter.{p}.weight" for i in range(n_layers) for p in ("norm", "linear")
    }
    cfg = json.loads((out / "dms_config.json").read_text())
    full_cfg = checkpoints.read_hf_config(run["full"])
    assert {k: v for k, v in cfg.items() if k.startswith("dms_")} == {
        k: v for k, v in full_cfg.items() if k.startswith("dms_")
    }
    assert cfg["base_verified"] is True and cfg["base_model"]["hidden_size"] == TINY["hidden_size"]

    full = checkpoints.load_dms_model(run["full"])
    both = checkpoints.load_dms_model(run["base"], adapter=out)
    assert both.dms_trained and both.adapter == out and full.adapter is None
    assert both.dms == full.dms and both.dms.decision == "adapter" and both.dms.window == WINDOW
    assert both.hf_config["dms_cr"] == 3.0
    for k, v in checkpoints.dms_state_dict(full.model).items():
        assert torch.equal(checkpoints.dms_state_dict(both.model)[k], v)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 40))
    ref, ref_evicted = _logits(full.model, tokens)
    got, got_evicted = _logits(both.model, tokens)
    assert torch.equal(got, ref)
    assert all(torch.equal(a, b) for a, b in zip(got_evicted, ref_evicted))
    frac = torch.stack([e.float().mean() for e in ref_evicted]).mean()
    assert 0.05 < frac < 0.95  # the adapter really decides: some tokens go, some stay
    # and the decisions matter: the base alone (zero adapter: nothing evicted) gives other logits
    plain = checkpoints.load_dms_model(run["base"], dms_overrides={"decision": "adapter", "window": WINDOW})
    assert not plain.dms_trained
    assert not torch.equal(_logits(plain.model, tokens)[0], ref)


def test_overrides_apply_on_top_of_the_adapter(run, tmp_path):
    out = checkpoints.export_adapter(run["full"], tmp_path / "adapter")
    dm = checkpoints.load_dms_model(run["base"], adapter=out, dms_overrides={"window": 7})
    assert dm.dms.window == 7 and dm.dms.final_cr == 3.0
    with pytest.raises(ValueError, match="needs decision=adapter"):
        checkpoints.load_dms_model(run["base"], adapter=out, dms_overrides={"decision": "borrowed"})


def test_low_precision_final_of_an_fp32_base_is_accepted(tmp_path):
    """The recipe's final folder holds the base in bf16; a bf16 copy of the fp32 base is the same base."""
    r = _retrofit(tmp_path, "llama_untied")
    sd = load_file(str(r["full"] / "model.safetensors"))
    save_file(
        {k: v if checkpoints.is_extra_key(k) else v.to(torch.bfloat16) for k, v in sd.items()},
        str(r["full"] / "model.safetensors"),
    )
    checkpoints.export_adapter(r["full"], tmp_path / "adapter", base_folder=r["base"])


def test_borrowed_variant_and_non_dms_folders_are_refused(run, tmp_path):
    dm = checkpoints.load_dms_model(run["base"])
    cfg = dict(dm.hf_config, **DMSConfig(decision="borrowed", window=WINDOW).to_hf())
    checkpoints.save_hf_checkpoint(dm.model, cfg, tmp_path / "borrowed", dm.family)
    with pytest.raises(ValueError, match="borrowed-variant .* an adapter alone cannot carry them"):
        checkpoints.export_adapter(tmp_path / "borrowed", tmp_path / "a", base_folder=run["base"])
    with pytest.raises(ValueError, match="not a DMS checkpoint"):
        checkpoints.export_adapter(run["base"], tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_modified_base_is_refused_when_the_base_is_given(run, tmp_path):
    mod = tmp_path / "all_weights"
    shutil.copytree(run["full"], mod)
    sd = load_file(str(mod / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0] += 0.01  # one weight moved: an all-weights retrofit
    save_file(sd, str(mod / "model.safetensors"))
    with pytest.raises(ValueError, match=r"differ from those of .* in 1 of .*down_proj"):
        checkpoints.export_adapter(mod, tmp_path / "a", base_folder=run["base"])
    assert not (tmp_path / "a").exists()
    other = tmp_path / "other_base"  # another model of the same shape
    shutil.copytree(run["base"], other)
    make_hf("qwen2_tied" if run["family"] == "llama" else "llama_untied").save_pretrained(other)
    with pytest.raises(ValueError, match="would not reproduce"):
        checkpoints.export_adapter(run["full"], tmp_path / "a", base_folder=other)
    # without the base nothing can tell: the export goes through, and says it was not checked
    out = checkpoints.export_adapter(mod, tmp_path / "a")
    assert json.loads((out / "dms_config.json").read_text())["base_verified"] is False


def test_adapter_that_does_not_fit_is_a_clear_error(run, tmp_path):
    out = checkpoints.export_adapter(run["full"], tmp_path / "adapter")
    sd = load_file(str(out / "dms_adapter.safetensors"))
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(out, wrong)
    save_file({**sd, LINEAR: torch.zeros(5, TINY["hidden_size"])}, str(wrong / "dms_adapter.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"does not fit .* has shape \(5, 64\) in the adapter, the model .* "
        r"needs \(2, 64\); the adapter was exported from",
    ):
        checkpoints.load_dms_model(run["base"], adapter=wrong)
    short = tmp_path / "fewer_layers"
    shutil.copytree(out, short)
    save_file({k: v for k, v in sd.items() if ".layers.1." not in k}, str(short / "dms_adapter.safetensors"))
    with pytest.raises(ValueError, match="does not fit .* missing"):
        checkpoints.load_dms_model(run["base"], adapter=short)
    (short / "dms_adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks dms_adapter.safetensors"):
        checkpoints.load_dms_model(run["base"], adapter=short)
    with pytest.raises(FileNotFoundError, match="full checkpoint folder"):
        checkpoints.load_dms_model(run["base"], adapter=run["full"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_dms_model(run["base"], adapter=tmp_path / "nope")


def test_export_replaces_an_adapter_folder_but_no_other_folder(run, tmp_path):
    out = checkpoints.export_adapter(run["full"], tmp_path / "adapter")
    (out / "stale").write_text("x")
    assert checkpoints.export_adapter(run["full"], out) == out and not (out / "stale").exists()
    with pytest.raises(ValueError, match="not an adapter folder"):
        checkpoints.export_adapter(run["full"], run["base"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folders left behind


def test_export_cli(run, tmp_path, capsys):
    assert cli.main(["export-adapter", str(run["full"]), str(tmp_path / "a"), "--base", str(run["base"])]) == 0
    assert "dms_adapter.safetensors" in capsys.readouterr().out
    assert cli.main(["export-adapter", str(run["base"]), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a DMS checkpoint" in err


# ----------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama run (transformers 5 would read the tiny word-level tokenizer as a Qwen2 BPE one for Qwen2)."""
    torch.manual_seed(0)
    return _retrofit(tmp_path_factory.mktemp("llama_gen"), "llama_untied")


def _generate(capsys, *argv):
    from dms_flex.generate import main

    rc = main(["--prompt", "hello world " * 20, "--max-new-tokens", "8", "--max-seq-len", "64", *argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out, cap.err


def _cr(out):
    return float(out.split("CR ")[1].split("x")[0])


def test_generate_with_an_adapter_equals_the_full_checkpoint(llama, tmp_path, capsys):
    adapter = checkpoints.export_adapter(llama["full"], tmp_path / "adapter")
    ref, _ = _generate(capsys, "--checkpoint", str(llama["full"]))
    out, err = _generate(capsys, "--checkpoint", str(llama["base"]), "--adapter", str(adapter))
    assert f"DMS adapter: {adapter} (decisions trained for CR 3x, window {WINDOW})" in err
    assert "no trained DMS decisions" not in err
    assert _cr(out) > 1.0
    strip = [line for line in ref.splitlines() if "tok/s" not in line]
    assert [line for line in out.splitlines() if "tok/s" not in line] == strip  # same text, memory and CR


def test_generate_default_model_uses_the_packaged_adapter(llama, tmp_path, capsys, monkeypatch):
    adapter = checkpoints.export_adapter(llama["full"], tmp_path / "adapters" / smollm2.MODEL_DIR_NAME)
    monkeypatch.setattr(smollm2, "default_model_dir", lambda: llama["base"])
    monkeypatch.setattr(smollm2, "ADAPTER_DIR", tmp_path / "adapters" / "missing")
    assert smollm2.packaged_adapter() is None
    out, err = _generate(capsys)
    assert "no trained DMS decisions" in err and "DMS adapter" not in err
    monkeypatch.setattr(smollm2, "ADAPTER_DIR", adapter)
    assert smollm2.packaged_adapter() == adapter
    ref, _ = _generate(capsys, "--checkpoint", str(llama["full"]))
    out, err = _generate(capsys)
    assert f"DMS adapter: packaged {adapter} (decisions trained for CR 3x" in err
    assert _cr(out) == _cr(ref) > 1.0
    out, err = _generate(capsys, "--no-adapter")
    assert "DMS adapter" not in err and "no trained DMS decisions" in err
    (adapter / "dms_config.json").unlink()  # incomplete: not offered
    assert smollm2.packaged_adapter() is None


def test_generate_cli_adapter_errors(llama, tmp_path, capsys):
    from dms_flex.generate import main

    assert main(["--checkpoint", str(llama["base"]), "--adapter", str(tmp_path / "nope"), "--prompt", "hello"]) == 2
    assert "error: adapter folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path), "--no-adapter"])
    assert "not allowed with" in capsys.readouterr().err


def test_package_data_includes_adapters():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["dms_flex"]
    rel = smollm2.ADAPTER_DIR.relative_to(root / "dms_flex")
    for name in ("dms_adapter.safetensors", "dms_config.json"):
        assert any(fnmatch.fnmatch(str(rel / name), g) for g in globs), globs


def test_eval_default_model_applies_the_packaged_adapter(run, tmp_path, monkeypatch):
    """python -m dms_flex.eval without --model evaluates the embedded base with its packaged adapter:
    the same perplexity and CR as evaluating the full retrofit checkpoint; --no-adapter differs."""
    from dms_flex import eval as ev

    if run["family"] != "llama":
        pytest.skip("one family is enough for the wiring")
    adapter = checkpoints.export_adapter(run["full"], tmp_path / "adapter", base_folder=run["base"])
    monkeypatch.setattr(smollm2, "default_model_dir", lambda: run["base"])
    monkeypatch.setattr(smollm2, "packaged_adapter", lambda: adapter)
    common = [
        "--device",
        "cpu",
        "--methods",
        "dms",
        "--metrics",
        "ppl",
        "--ppl-len",
        "24",
        "--ppl-prefix",
        "4",
        "--texts",
        "code",
    ]

    def ppl(extra, out):
        res = ev.run(ev.parse_args(common + extra + ["--out", str(tmp_path / out)]), log=lambda s: None)
        (r,) = res["runs"]
        return r["ppl"]["ppl"], r["cr"]

    packaged = ppl([], "a")
    full = ppl(["--model", str(run["full"])], "b")
    untrained = ppl(["--no-adapter"], "c")
    assert packaged == pytest.approx(full, rel=1e-6)
    assert packaged != pytest.approx(untrained, rel=1e-6)
