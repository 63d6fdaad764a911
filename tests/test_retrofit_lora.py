"""The small student: the DMS adapter plus torchtune LoRA on the frozen base (`lora:` in the recipe).

- the LoRA layers are torchtune's LoRALinear; only they and the DMS adapter train;
- the teacher is the frozen base without LoRA (the distillation loss equals KL(base || student));
- the factors are saved unmerged (Hugging Face names and layout) and every loader merges them:
  final folder == base + exported adapter folder, in the torchtune path and in dms_flex.hf, and both
  equal the unmerged student; the adapter folder is small;
- a recipe run trains them, keeps the base bit-identical, and resumes exactly.
"""

import copy
import math
from pathlib import Path

import pytest
import torch

from dms_flex import checkpoints
from dms_flex import torchtune_model as tm
from dms_flex.checkpoints.lora import LORA_MODULES, LoRASettings, apply_lora, lora_to_hf, lora_to_tune
from dms_flex.config import DMSConfig

from .helpers import log_lines, make_hf, run_recipe, tiny_model, tiny_tokenizer, weights
from .test_retrofit import assert_one_clear_message

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = tuple(LORA_MODULES)  # attention and MLP


def randomize_lora(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# ============================================================================ modules and training set-up
def test_lora_layers_are_torchtunes_and_start_as_the_base():
    from torchtune.modules.peft import LoRALinear, get_adapter_params

    m = tiny_model(decision="adapter")
    base = copy.deepcopy(m)
    names = set(m.state_dict())
    apply_lora(m, LoRASettings(rank=4, alpha=8.0, modules=ALL))
    assert all(isinstance(getattr(layer.attn, n), LoRALinear) for layer in m.layers for n in ("q_proj", "output_proj"))
    assert isinstance(m.layers[1].mlp.w2, LoRALinear)
    assert names <= set(m.state_dict())  # the base keeps its names (and tensors)
    assert m.layers[0].attn.q_proj.weight is not None and len(get_adapter_params(m)) == 2 * 7 * 2
    x = torch.randint(0, 64, (2, 20))
    assert torch.equal(logits(m, x), logits(base, x))  # lora_b starts at zero


def test_only_lora_and_the_adapter_train():
    from dms_flex.retrofit.models import freeze_base

    m = tiny_model(decision="adapter")
    apply_lora(m, LoRASettings(rank=2, alpha=4.0))
    freeze_base(m, distributed=False, compute_dtype=torch.bfloat16)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {
        f"layers.{i}.attn.{mod}.lora_{ab}.weight"
        for i in range(2)
        for mod in ("q_proj", "k_proj", "v_proj", "output_proj")
        for ab in "ab"
    } | {f"layers.{i}.attn.dms_adapter.{w}.weight" for i in range(2) for w in ("norm", "linear")}
    assert trained == expected
    assert m.layers[0].attn.q_proj.weight.dtype == torch.bfloat16  # frozen: compute dtype
    assert m.layers[0].attn.q_proj.lora_a.weight.dtype == torch.float32  # trained: fp32 master


def test_teacher_is_the_base_without_lora():
    """RetrofitStep's KD loss equals KL(base || student) computed here from a LoRA-free copy; with the
    LoRA'd model as teacher it would differ. The LoRA layers are enabled again afterwards."""
    from dms_flex.losses import chunked_kd_loss, distillation_mask
    from dms_flex.retrofit.step import RetrofitStep

    m = tiny_model(decision="adapter", offset=5.0)
    base = copy.deepcopy(m)
    apply_lora(m, LoRASettings(rank=4, alpha=8.0, modules=ALL))
    randomize_lora(m)
    step = RetrofitStep(
        m, None, activation_checkpointing=False, kd_chunk_size=7, kd_temperature=1.0, log_lm_loss=False, lora=True
    )
    tokens = torch.randint(0, 64, (2, 24))
    targets = torch.roll(tokens, -1, 1)
    doc_ids, valid = torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    r = step(tokens, targets, doc_ids, valid, torch.tensor(0.0), g)
    student = tm.forward_train(m, tokens, doc_ids=doc_ids, training=True, generator=torch.Generator().manual_seed(3))
    mask = distillation_mask(targets)
    w = tm.output_weight(m)
    with torch.no_grad():
        t_base = tm.forward_train(base, tokens, doc_ids=doc_ids, eviction=False, training=False).hidden
        t_lora = tm.forward_train(m, tokens, doc_ids=doc_ids, eviction=False, training=False).hidden
    ref = chunked_kd_loss(student.hidden, t_base, w, mask, chunk_size=7)
    wrong = chunked_kd_loss(student.hidden, t_lora, w, mask, chunk_size=7)
    assert torch.allclose(r["kd"], ref, rtol=1e-5, atol=1e-7), (r["kd"], ref)
    assert not torch.allclose(ref, wrong, rtol=1e-3)
    assert not any(getattr(mod, "disabled", False) for mod in m.modules())


# ============================================================================ names and layout
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_factors_convert_like_the_weights(family):
    """lora_to_hf(B) @ A is torchtune's own conversion of the merged delta B @ A (q/k rows permuted for
    Llama); lora_to_tune inverts lora_to_hf exactly."""
    from dms_flex.checkpoints.keys import tune_to_hf

    cfg = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}
    cfg.update(vocab_size=64, intermediate_size=64)
    cfg["model_type"] = family if family == "llama" else "qwen2"
    g = torch.Generator().manual_seed(0)
    sd, deltas = {}, {}
    for mod, out_dim in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("output_proj", 32)):
        a, b = torch.randn(3, 32, generator=g), torch.randn(out_dim, 3, generator=g)
        sd[f"layers.0.attn.{mod}.lora_a.weight"], sd[f"layers.0.attn.{mod}.lora_b.weight"] = a, b
        deltas[f"layers.0.attn.{mod}.weight"] = b @ a
    hf = lora_to_hf(sd, cfg, family)
    for name, delta in tune_to_hf(deltas, cfg, family).items():
        m = name[: -len(".weight")]
        assert torch.allclose(hf[f"{m}.lora_B.weight"] @ hf[f"{m}.lora_A.weight"], delta, atol=1e-6), name
    back = lora_to_tune(hf, cfg, family)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ============================================================================ export and load
def lora_retrofit(root: Path, case: str, modules=ALL):
    """base/: a tiny random HF model; final/: what the recipe saves for an adapter + LoRA retrofit of it
    (same base weights, random adapter and LoRA factors). Returns (unmerged student, settings)."""
    from dms_flex.retrofit.checkpointing import checkpoint_hf_config, checkpoint_weights, write_checkpoint

    make_hf(case).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    dm = checkpoints.load_dms_model(root / "base", dms_overrides={"decision": "adapter", "window": 3, "final_cr": 3.0})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in dm.model.layers:
            layer.attn.dms_adapter.linear.weight.copy_(
                0.05 * torch.randn(layer.attn.dms_adapter.linear.weight.shape, generator=g)
            )
    settings = LoRASettings(rank=4, alpha=8.0, modules=modules)
    apply_lora(dm.model, settings)
    randomize_lora(dm.model, scale=0.1)
    hf_config = checkpoint_hf_config(dm.hf_config, dm.dms, False, "none", settings)
    weights_ = checkpoint_weights(dm.model.state_dict(), torch.float32)
    write_checkpoint(root / "final", weights_, hf_config, dm.family, dm.tokenizer, None, {}, final=True)
    return dm.model.eval(), settings


def logits(model, tokens):
    with torch.no_grad():
        return tm.logits_of(model, tm.forward_train(model, tokens, training=False).hidden)


@pytest.mark.parametrize("case", ["llama_untied", "llama_tied", "qwen2_untied"])
def test_export_and_load_round_trip(case, tmp_path):
    import dms_flex.hf

    student, settings = lora_retrofit(tmp_path, case)
    adapter = checkpoints.export_adapter(tmp_path / "final", tmp_path / "adapter", base_folder=tmp_path / "base")
    tokens = torch.randint(0, 128, (2, 24))
    full = checkpoints.load_dms_model(tmp_path / "final")
    applied = checkpoints.load_dms_model(tmp_path / "base", adapter=adapter)
    assert full.lora == settings and applied.lora == settings and applied.dms.decision == "adapter"
    a, b = logits(full.model, tokens), logits(applied.model, tokens)
    assert torch.equal(a, b)  # the same merge of the same tensors
    assert torch.allclose(a, logits(student, tokens), atol=1e-5)  # merged == the unmerged LoRA layers
    plain = checkpoints.load_dms_model(tmp_path / "base", dms_overrides={"decision": "adapter", "window": 3})
    assert (a - logits(plain.model, tokens)).abs().max() > 1e-2  # the LoRA matters
    # dms_flex.hf merges the same deltas: bit-identical weights, the torchtune path's logits
    ha = dms_flex.hf.from_pretrained(tmp_path / "final", dtype=torch.float32)
    hb = dms_flex.hf.from_pretrained(tmp_path / "base", adapter=adapter, dtype=torch.float32)
    for (n, p), (n2, q) in zip(ha.named_parameters(), hb.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    with torch.no_grad():
        hl = ha(tokens).logits
    assert (hl - a).abs().max() < 1e-4
    # the torchtune loader's merged q_proj equals the HF model's (one conversion apart)
    q = checkpoints.keys.tune_to_hf(
        {"layers.0.attn.q_proj.weight": full.model.layers[0].attn.q_proj.weight}, full.hf_config, full.family
    )
    assert torch.equal(q["model.layers.0.self_attn.q_proj.weight"], ha.model.layers[0].self_attn.q_proj.weight)


def test_adapter_folder_is_small(tmp_path):
    """adapter + LoRA factors (fp32): their bytes, against the whole checkpoint."""
    student, _ = lora_retrofit(tmp_path, "llama_untied", modules=("q_proj", "k_proj", "v_proj", "output_proj"))
    adapter = checkpoints.export_adapter(tmp_path / "final", tmp_path / "adapter")
    n_trained = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n or "dms_adapter" in n)
    size = sum(f.stat().st_size for f in adapter.iterdir())
    # rank 4 on q, k, v, o of 2 layers (64 wide, 32-wide k/v) + the adapters: 4 bytes each, plus headers
    assert n_trained == 2 * (4 * 64 + 64 * 4 + 2 * (4 * 64 + 32 * 4) + 4 * 64 + 64 * 4) + 2 * (64 + 2 * 64)
    assert 4 * n_trained < size < 4 * n_trained + 16_000
    assert size < (tmp_path / "final" / "model.safetensors").stat().st_size / 5


def test_lora_folders_that_do_not_fit_are_clear_errors(tmp_path):
    import json

    lora_retrofit(tmp_path, "llama_untied")
    adapter = checkpoints.export_adapter(tmp_path / "final", tmp_path / "adapter")
    cfg = json.loads((adapter / "dms_config.json").read_text())
    cfg["dms_lora_rank"] = 2
    (adapter / "dms_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the model"):
        checkpoints.load_dms_model(tmp_path / "base", adapter=adapter)
    (adapter / "dms_lora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dms_lora.safetensors is missing"):
        checkpoints.load_dms_model(tmp_path / "base", adapter=adapter)


# ============================================================================ the recipe
LORA_RUN = ["--config", "tiny", "train_adapter_only=true", "lora.enabled=true", "max_steps=3", "save_every_n_steps=2"]
# a decaying lr (torchtune's cosine schedule over the run), as benchmarks/h200/smollm2_ladder.sh's *_cos runs use
COSINE = [
    "lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
    "lr_scheduler.num_warmup_steps=0",
]


def test_recipe_trains_lora_on_a_frozen_base_and_resumes_exactly(tmp_path):
    """...with the cosine lr schedule: the lr decays step by step, and a resumed run restores it."""
    a = run_recipe(tmp_path, *LORA_RUN, *COSINE, "output_dir=straight")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    assert "LoRA rank 8 on q_proj/k_proj/v_proj/output_proj" in a.stdout and "and LoRA disabled" in a.stdout
    final = weights(tmp_path / "straight" / "final")
    lora = {k: v for k, v in final.items() if ".lora_" in k}
    assert len(lora) == 2 * 4 * 2 and all(v.dtype == torch.float32 for v in lora.values())
    assert all(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from zero
    # the base is frozen: every base tensor equals the model the run started from
    from dms_flex.data import hf_tokenizer
    from dms_flex.retrofit.config_checks import CONFIG_DIR
    from dms_flex.retrofit.models import original_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_DIR / "tiny.yaml")
    original, hf_config, family = original_model(
        cfg, DMSConfig(decision="adapter"), hf_tokenizer("bytes"), 0, torch.float32
    )
    sd = {k: v for k, v in original.state_dict().items() if "dms" not in k}
    base = checkpoints.keys.tune_to_hf(sd, hf_config, family)
    for k, v in base.items():
        assert torch.equal(final[k], v), k
    assert [v["kd_loss"] for _, v in log_lines(tmp_path / "straight") if "kd_loss" in v][-1] > 0
    lrs = [v["lr"] for _, v in log_lines(tmp_path / "straight") if "lr" in v]
    assert (
        len(lrs) == 3 and lrs[0] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 3)) / 2) and lrs[0] > lrs[1] > lrs[2]
    )

    b = run_recipe(tmp_path, *LORA_RUN, *COSINE, "output_dir=resumed", "resume_from=straight/step_000002")
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    resumed = weights(tmp_path / "resumed" / "final")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora.enabled=true"], "lora.enabled=true trains LoRA on a frozen base: it needs dms.decision=adapter"),
        (["lora.enabled=true", "train_adapter_only=true", "lora.rank=0"], "lora.rank=0 is invalid"),
        (["lora.enabled=true", "train_adapter_only=true", "lora.modules=[q_proj,wq]"], "lora.modules=['q_proj', 'wq']"),
        (["lora.enabled=true", "train_adapter_only=true", "lora.alpha=-1"], "lora.alpha=-1 is invalid"),
        (["lora.ranks=4"], "unknown key(s) lora.ranks"),
        (
            ["lora.enabled=true", "train_adapter_only=true", "quant.base_weights=int8"],
            "lora.enabled=true with quant.base_weights=int8 is not supported",
        ),
    ],
)
def test_bad_lora_values_are_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    assert_one_clear_message(args, message, tmp_path, monkeypatch, capsys)


def test_evaluation_reference_of_a_lora_student_is_the_base_before_the_retrofit(tmp_path):
    """python -m dms_flex.eval on a LoRA student (its final folder, or base + exported adapter): KL and the
    reference perplexity are against the model before the retrofit (the distillation's teacher), not the
    student itself; an adapter without LoRA keeps --model as the reference."""
    from argparse import Namespace

    from dms_flex.eval.quantization import load_reference

    lora_retrofit(tmp_path, "llama_untied")
    adapter = checkpoints.export_adapter(tmp_path / "final", tmp_path / "adapter", base_folder=tmp_path / "base")
    plain = checkpoints.load_dms_model(tmp_path / "base", dms_overrides={"decision": "adapter", "window": 3})
    base_weights = {k: v for k, v in plain.model.state_dict().items() if "dms_adapter" not in k}
    args = Namespace(reference=None, weight_quant="none")
    for folder, kw in ((tmp_path / "final", {}), (tmp_path / "base", {"adapter": adapter})):
        student = checkpoints.load_dms_model(folder, **kw)
        logs = []
        ref, name = load_reference(args, student, folder, logs.append)
        assert ref is not student.model and "without the LoRA" in name and "before the retrofit" in logs[0]
        got, merged = ref.state_dict(), student.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in base_weights.items())  # the base weights, bit for bit
        assert not torch.equal(merged["layers.0.attn.q_proj.weight"], base_weights["layers.0.attn.q_proj.weight"])
    no_lora = checkpoints.load_dms_model(tmp_path / "base", dms_overrides={"decision": "adapter", "window": 3})
    ref, name = load_reference(args, no_lora, tmp_path / "base", lambda s: None)
    assert ref is no_lora.model and name == str(tmp_path / "base")
