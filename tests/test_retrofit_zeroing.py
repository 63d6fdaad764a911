"""Phase 1 of a borrowed-variant retrofit (`zeroing_steps`, docs/design.md "Losses and schedule"): the
borrowed query channel's rows of q_proj scaled from 1 to 0 over N distillation-only steps, the CR schedule
after it; resume mid-phase-1 and FSDP2 equal an uninterrupted run.

References are computed here by hand: the scale of step k is 1 - (k + 1) / N, the channel is the last
channel of the first query head of each KV group (the one `decisions.borrowed_logits` reads), and the
rows at step k are the original model's rows times that scale.
"""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from dms_flex import decisions
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig
from dms_flex.retrofit.zeroing import NeuronZeroing, borrowed_rows, zeroing_scale

from .helpers import log_lines, run_recipe, tiny_model, weights
from .test_retrofit import assert_one_clear_message

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ the schedule and the rows
def test_scale_per_step():
    assert [zeroing_scale(k, 4) for k in range(7)] == [0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert [zeroing_scale(k, 1) for k in range(3)] == [0.0, 0.0, 0.0]
    assert zeroing_scale(0, 2000) == 1 - 1 / 2000 and zeroing_scale(1999, 2000) == 0.0


@pytest.mark.parametrize("heads, expected", [((4, 2), [7, 23]), ((4, 1), [7]), ((4, 4), [7, 15, 23, 31])])
def test_borrowed_rows_are_the_channel_the_decisions_read(heads, expected):
    """head_dim 8 (width 32, 4 heads): row h*8+7 of q_proj is channel 7 of head h, for the first head of
    each group; the rows are those whose output borrowed_logits reads (through the model's projection)."""
    m = tiny_model(heads=heads)
    attn = m.layers[0].attn
    assert borrowed_rows(attn) == expected
    x = torch.randn(1, 5, 32)
    q = attn.q_proj(x).view(1, 5, attn.num_heads, attn.head_dim).transpose(1, 2)
    cfg = DMSConfig(alpha_scale=1.0, alpha_offset=0.0)
    logits = decisions.borrowed_logits(q, attn.num_kv_heads, cfg)  # (1, Hkv, T)
    rows_out = (x @ attn.q_proj.weight.t())[..., expected]  # (1, T, Hkv)
    assert torch.allclose(logits, rows_out.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rows_follow_the_schedule_and_get_no_update(family):
    """set_weights(k) puts exactly original * (1 - (k+1)/N) into the rows (bias too: Qwen2) and nothing
    else; zero_grads clears the rows' gradients only."""
    m = tiny_model(family=family)
    original = copy.deepcopy(m)
    z = NeuronZeroing.capture(original, steps=3)
    for k, scale in enumerate([1 - 1 / 3, 1 - 2 / 3, 0.0, 0.0]):
        # training moved every weight in between: the rows are rewritten from the original, not rescaled
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
        before = copy.deepcopy(m.state_dict())
        assert z.set_weights(m, k) == scale
        for name, t in m.state_dict().items():
            if not name.endswith("q_proj.weight") and not name.endswith("q_proj.bias"):
                assert torch.equal(t, before[name]), name
        for i, (layer, orig) in enumerate(zip(m.layers, original.layers)):
            rows = borrowed_rows(layer.attn)
            w, w0 = layer.attn.q_proj.weight, orig.attn.q_proj.weight
            assert torch.equal(w[rows], w0[rows] * scale)
            others = [r for r in range(w.shape[0]) if r not in rows]
            assert torch.equal(w[others], before[f"layers.{i}.attn.q_proj.weight"][others])
            if family == "qwen2":
                b, b0 = layer.attn.q_proj.bias, orig.attn.q_proj.bias
                assert torch.equal(b[rows], b0[rows] * scale)
    x = torch.randint(0, 64, (1, 12))
    tm.logits_of(m, tm.forward_train(m, x, eviction=False, training=True).hidden).sum().backward()
    z.zero_grads(m)
    for layer in m.layers:
        rows, g = borrowed_rows(layer.attn), layer.attn.q_proj.weight.grad
        assert torch.all(g[rows] == 0) and g.abs().sum() > 0
        if family == "qwen2":
            assert torch.all(layer.attn.q_proj.bias.grad[rows] == 0)


# ============================================================================ the recipe
COMMON = ["--config", "tiny", "dms.decision=borrowed", "zeroing_steps=3", "max_steps=2", "save_every_n_steps=1"]


def original_rows():
    """The borrowed rows of the tiny config's random-init model, built as the recipe builds it."""
    from dms_flex.data import hf_tokenizer
    from dms_flex.retrofit.config_checks import CONFIG_DIR
    from dms_flex.retrofit.models import original_model

    cfg = OmegaConf.load(CONFIG_DIR / "tiny.yaml")
    model, _, _ = original_model(cfg, DMSConfig(decision="borrowed"), hf_tokenizer("bytes"), 0, torch.float32)
    return [layer.attn.q_proj.weight.detach()[borrowed_rows(layer.attn)] for layer in model.layers], model


def saved_rows(folder):
    from dms_flex.checkpoints import load_hf_checkpoint

    m = load_hf_checkpoint(folder).model
    return [layer.attn.q_proj.weight.detach()[borrowed_rows(layer.attn)] for layer in m.layers], m


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("zeroing")
    p = run_recipe(cwd, *COMMON, "output_dir=straight")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return cwd, p


def test_phase_1_then_the_cr_schedule(straight):
    cwd, p = straight
    rows = [v for _, v in log_lines(cwd / "straight") if "kd_loss" in v]
    assert [r["zeroing_scale"] for r in rows] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    # distillation only in phase 1; then tiny's schedule (CR 1 -> 4 over 8 steps) from its step 0
    assert [r["compression_loss"] for r in rows[:3]] == [0.0, 0.0, 0.0]
    assert [r["achieved_cr"] for r in rows[:3]] == [1.0, 1.0, 1.0]
    assert [r["target_cr"] for r in rows] == pytest.approx([1.0, 1.0, 1.0, 1.0, 1 + 3 / 8])
    assert rows[-1]["compression_loss"] > 0.2  # target CR 1.375 with a channel that starts at 0: nothing evicted yet
    assert "3 steps zeroing the borrowed channel, then CR 1 -> 4 over 8 steps" in p.stdout


def test_channel_weights_at_each_step(straight):
    """step_00000k holds the rows of step k-1's forward: original * (1 - k/3); the other weights trained;
    in phase 2 the rows train from 0."""
    cwd, _ = straight
    w0, original = original_rows()
    for k, scale in ((1, 1 - 1 / 3), (2, 1 - 2 / 3), (3, 0.0), (4, None)):
        got, model = saved_rows(cwd / "straight" / f"step_{k:06d}")
        for g, r in zip(got, w0):
            if scale is not None:
                assert torch.equal(g, r * scale), (k, (g - r * scale).abs().max())
            else:  # phase 2: the channel is the decision neuron now, trained from 0
                assert g.abs().max() > 0
        assert not torch.equal(model.layers[0].attn.k_proj.weight, original.layers[0].attn.k_proj.weight)


def test_resume_mid_phase_1_equals_uninterrupted_run(straight):
    cwd, _ = straight
    p = run_recipe(cwd, *COMMON, "output_dir=resumed", "resume_from=straight/step_000001")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "at step 1" in p.stdout
    wa, wb = weights(cwd / "straight" / "final"), weights(cwd / "resumed" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [v for s, v in log_lines(cwd / "straight") if s >= 2 and "kd_loss" in v]
    lb = [v for s, v in log_lines(cwd / "resumed") if s >= 2 and "kd_loss" in v]
    keys = ("kd_loss", "compression_loss", "achieved_cr", "zeroing_scale")
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]


def test_zeroing_is_part_of_the_run_settings(straight):
    cwd, _ = straight
    args = [*COMMON[:3], "zeroing_steps=2", "max_steps=3", "output_dir=other", "resume_from=straight/step_000001"]
    p = run_recipe(cwd, *args)
    assert p.returncode != 0 and "zeroing_steps=3 there, 2 now" in p.stderr


def test_fsdp2_phase_1_and_its_resume(tmp_path):
    """Two gloo ranks: each rank writes the rows of its own shard (rows 15 and 47 of q_proj's 64 sit on
    different ranks); resumed mid-phase-1 the run ends bit-identical."""
    common = ["--config", "tiny", "dms.decision=borrowed", "zeroing_steps=2", "max_steps=1", "save_every_n_steps=1"]
    a = run_recipe(tmp_path, *common, "output_dir=fsdp", nproc=2)
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-4000:]
    assert "2 rank(s)" in a.stdout
    w0, _ = original_rows()
    got, _ = saved_rows(tmp_path / "fsdp" / "step_000001")
    for g, r in zip(got, w0):
        assert torch.equal(g, r * 0.5)
    got, _ = saved_rows(tmp_path / "fsdp" / "step_000002")
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)
    b = run_recipe(tmp_path, *common, "output_dir=fsdp_resumed", "resume_from=fsdp/step_000001", nproc=2)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-4000:]
    wa, wb = weights(tmp_path / "fsdp" / "final"), weights(tmp_path / "fsdp_resumed" / "final")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    "args, message",
    [
        (["dms.decision=borrowed", "zeroing_steps=-1"], "zeroing_steps=-1 is invalid"),
        (["dms.decision=borrowed", "zeroing_steps=1.5"], "zeroing_steps=1.5 is invalid"),
    ],
)
def test_bad_zeroing_values_are_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    assert_one_clear_message(args, message, tmp_path, monkeypatch, capsys)
