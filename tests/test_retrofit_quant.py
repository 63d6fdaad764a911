"""Retrofit under quantization (recipe `quant:` section) on CPU with the `tiny` config: int8-KV-aware
training, an int8 / NF4 frozen base, the saved folders, their export to dms_flex.generate, and the
errors for combinations that cannot work.

The export tests check that a retrofit output, reloaded and re-quantized the way generate does it,
computes what the recipe trained and measured: teacher-forced hard-decision logits with int8 K/V
(forward_train(training=False, kv_int8=True)) equal the int8 compact cache's prefill/decode logits.
"""

import json
import subprocess
import sys

import pytest
import torch

from dms_flex import quant, stats
from dms_flex import torchtune_model as tm

from .helpers import log_lines, run_recipe, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny retrofits from one user folder: int8 KV (all weights train), int8 KV on an int8
    frozen base (adapter only), and a short NF4-base run."""
    cwd = tmp_path_factory.mktemp("user_folder")
    common = ["--config", "tiny", "save_every_n_steps=null"]
    jobs = {
        "kv": common + ["quant.kv_int8=true", "output_dir=dms_runs/kv"],
        "w8": common
        + ["quant.kv_int8=true", "quant.base_weights=int8", "train_adapter_only=true", "output_dir=dms_runs/w8"],
        "nf4": common + ["quant.base_weights=nf4", "train_adapter_only=true", "max_steps=2", "output_dir=dms_runs/nf4"],
    }
    out = {}
    for name, args in jobs.items():
        p = run_recipe(cwd, *args)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out[name] = (cwd / "dms_runs" / name, p)
    return out


def dms_keys(folder):
    return {k: v for k, v in json.loads((folder / "final" / "config.json").read_text()).items() if k.startswith("dms")}


def test_switches_are_logged_and_saved(runs):
    kv, w8, nf4 = (runs[k][0] for k in ("kv", "w8", "nf4"))
    assert dms_keys(kv)["dms_kv_dtype"] == "int8" and "dms_weight_quant" not in dms_keys(kv)
    assert dms_keys(w8)["dms_kv_dtype"] == "int8" and dms_keys(w8)["dms_weight_quant"] == "int8"
    assert dms_keys(nf4)["dms_weight_quant"] == "nf4" and "dms_kv_dtype" not in dms_keys(nf4)
    for folder, kv_int8, base in ((kv, True, "none"), (w8, True, "int8"), (nf4, False, "nf4")):
        logged = (folder / "torchtune_config.yaml").read_text()  # the run's config as torchtune logged it
        assert f"kv_int8: {str(kv_int8).lower()}" in logged and f"base_weights: {base}" in logged, logged
    # every run prints its labelled memory estimate (dms_flex/retrofit/memory_fit.py); the quantized base
    # also says what it quantized, the plain run quantizes nothing
    p_w8, p_kv = runs["w8"][1], runs["kv"][1]
    assert (
        "ESTIMATE (not a measurement)" in p_w8.stdout and "15 linear weights quantized" in p_w8.stdout
    )  # 2 x 7 + output
    assert "ESTIMATE (not a measurement)" in p_kv.stdout and "linear weights quantized" not in p_kv.stdout
    assert "left in torch.float32 (size not NF4-blockable): output" in runs["nf4"][1].stdout
    # int8-KV training still learns to evict (tiny asks for CR 4 in 8 steps)
    for folder in (kv, w8):
        evals = [vals["eval_cr"] for _, vals in log_lines(folder) if "eval_cr" in vals]
        assert evals[0] == 1.0 and evals[-1] > 1.1, evals


def test_quantized_base_saves_plain_full_precision_weights(runs):
    """The frozen base is saved as the weights it was quantized from (both runs start from the same
    seed), plain tensors in a normal HF folder; only the adapter moved."""
    a, b = weights(runs["w8"][0] / "final"), weights(runs["nf4"][0] / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is torch.Tensor and a[k].dtype == torch.float32
        if "dms_adapter" not in k:
            assert torch.equal(a[k], b[k]), k
    adapters = [k for k in a if "dms_adapter" in k and k.endswith("linear.weight")]
    assert adapters and all(a[k].abs().sum() > 0 for k in adapters)


def _eval_batch():
    from tests.helpers import eval_batch

    return eval_batch()


def _load(folder, weight_quant):
    from dms_flex.checkpoints import load_dms_model

    dm = load_dms_model(folder / "final", max_seq_len=256)
    quant.quantize_weights(dm.model, weight_quant)
    return dm


@pytest.mark.parametrize("name, weight_quant", [("kv", "none"), ("w8", "int8")])
def test_export_reproduces_training_numerics(runs, name, weight_quant):
    from dms_flex.retrofit.metrics import kept_tokens
    from dms_flex.stats import CompressionReport

    folder = runs[name][0]
    dm = _load(folder, weight_quant)
    m = dm.model
    if weight_quant == "int8":
        assert type(m.layers[0].attn.q_proj.weight).__name__ == "AffineQuantizedTensor"
    # 1. the recipe's last hard-decision CR (int8 K/V, quantized base) is what the reloaded model measures
    batch = _eval_batch()
    with torch.no_grad():
        evicted = tm.forward_train(m, batch["tokens"], doc_ids=batch["doc_ids"], training=False, kv_int8=True).evicted
    kept, seen = kept_tokens(evicted, batch["doc_ids"], batch["valid"], 16)
    logged = [vals["eval_cr"] for _, vals in log_lines(folder) if "eval_cr" in vals][-1]
    assert CompressionReport(per_layer_head=kept / seen).ratio == pytest.approx(logged, rel=1e-6)
    # 2. teacher-forced logits with int8 K/V == the int8 compact cache's generation logits
    prompt = batch["tokens"][:1, :96]
    state = tm.InferenceState(m, 1, max_seq_len=256, kv_dtype=torch.int8)
    with torch.no_grad():
        logits = [tm.prefill(m, prompt, state)]
        toks = [prompt]
        for _ in range(24):
            nxt = logits[-1].argmax(-1, keepdim=True)
            toks.append(nxt)
            logits.append(tm.decode_step(m, nxt, state))
        full = torch.cat(toks, 1)
        out = tm.forward_train(m, full, training=False, kv_int8=True)
        ref = tm.logits_of(m, out.hidden)[:, prompt.shape[1] - 1 :]
    got = torch.stack(logits, 1)
    assert torch.allclose(got, ref, atol=5e-3, rtol=1e-3), float((got - ref).abs().max())
    assert torch.equal(got.argmax(-1)[:, :-1], full[:, prompt.shape[1] :])  # same greedy tokens
    window = dm.dms.effective_window
    for cache, ev in zip(state.caches, out.evicted):
        assert torch.equal(cache.length, (stats.kept_fraction(ev, window) * full.shape[1]).round().long())
    assert sum(int(e.sum()) for e in out.evicted) > 0  # the trained adapter evicts on this text


def _generate(folder, *flags):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dms_flex.generate",
            "--checkpoint",
            str(folder / "final"),
            "--prompt",
            "def load(",
            "--max-new-tokens",
            "6",
            "--max-seq-len",
            "256",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_defaults_come_from_config_and_flags_win(runs):
    w8 = runs["w8"][0]
    p = _generate(w8)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "KV cache (int8)" in p.stdout and "(int8 weight quantization)" in p.stdout, p.stdout
    p = _generate(w8, "--kv", "model", "--weight-quant", "none")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "KV cache (float32)" in p.stdout and "(none weight quantization)" in p.stdout, p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["quant.base_weights=int8"],
            "quant.base_weights=int8 quantizes a frozen base: it needs train_adapter_only=true",
        ),
        (
            ["quant.base_weights=nf4", "train_adapter_only=true", "dms.decision=borrowed"],
            "train_adapter_only=true needs dms.decision=adapter",
        ),
        (["quant.base_weights=int4", "train_adapter_only=true"], "quant.base_weights='int4' is invalid"),
        (["quant.kv_int8=2"], "quant.kv_int8=2 is invalid"),
        (["quant.kv_int4=true"], "unknown key(s) quant.kv_int4"),
        (["quant=int8"], "quant must be a mapping"),
    ],
)
def test_bad_quant_settings_are_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    from .test_retrofit import assert_one_clear_message

    assert_one_clear_message(args, message, tmp_path, monkeypatch, capsys)


def test_capacity_estimate_for_an_8b_adapter_retrofit():
    """Llama-3-8B shapes: ~7.5B quantized linear parameters (output projection included) plus bf16
    embeddings; int8 about 8 GiB of weights, NF4 about 4.6 GiB."""
    from omegaconf import OmegaConf

    from dms_flex.config import DMSConfig
    from dms_flex.retrofit.memory import capacity_estimate

    hf = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "vocab_size": 128256,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    }
    cfg = OmegaConf.create(
        {"batch_size": 1, "max_seq_len": 8192, "enable_activation_checkpointing": True, "kd_chunk_size": 1024}
    )
    dms = DMSConfig(decision="adapter")
    for base, lo, hi in (("int8", 7.5, 8.5), ("nf4", 4.2, 5.0)):
        text = capacity_estimate(hf, base, dms, cfg)
        assert text.startswith("ESTIMATE (not a measurement)")
        gib = float(text.split("weights ")[1].split(" GiB")[0])
        assert lo < gib < hi, text
        assert "adapter 1,179,648 params" in text  # 32 x (4096 x 8 + 4096)


def test_resume_on_a_quantized_base_equals_an_uninterrupted_run(tmp_path):
    """step_NNNNNN/ of an int8-base run holds the full-precision base; resuming re-quantizes it and
    continues exactly (same adapter weights at the end)."""
    import shutil

    args = [
        "--config",
        "tiny",
        "quant.kv_int8=true",
        "quant.base_weights=int8",
        "train_adapter_only=true",
        "max_steps=3",
        "save_every_n_steps=2",
    ]
    p = run_recipe(tmp_path, *args, "output_dir=dms_runs/a")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a = tmp_path / "dms_runs" / "a"
    (tmp_path / "dms_runs" / "b").mkdir()
    shutil.copytree(a / "step_000002", tmp_path / "dms_runs" / "b" / "step_000002")
    p = run_recipe(tmp_path, *args, "output_dir=dms_runs/b", "resume_from=latest")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout
    wa, wb = weights(a / "final"), weights(tmp_path / "dms_runs" / "b" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_quantized_base_refuses_fsdp_before_starting(tmp_path):
    p = run_recipe(
        tmp_path, "--config", "tiny", "quant.base_weights=int8", "train_adapter_only=true", "max_steps=1", nproc=2
    )
    assert p.returncode != 0
    assert "quant.base_weights=int8 runs on one device" in p.stderr + p.stdout
    assert not (tmp_path / "dms_runs").exists()
