"""Benchmarks of the retrofit (issue 20): random_init / benchmark / synthetic data in the recipe, the step-time
split, the memory model and its fit, and benchmarks/bench_retrofit.py's CPU smoke and limit search.

References are independent of the code under test: the published parameter counts of Llama-3-8B and
Qwen2.5-7B, document lengths summed by hand, sleeps of known length, coefficients chosen before the fit.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dms_flex import data as dms_data
from dms_flex.retrofit import memory_fit, random_init, timing
from dms_flex.retrofit.config_checks import CONFIG_DIR

from .helpers import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parent.parent


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_retrofit", REPO / "benchmarks" / "bench_retrofit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_retrofit"] = mod
    spec.loader.exec_module(mod)
    return mod


def config(name, *overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), OmegaConf.from_dotlist(list(overrides)))


# ============================================================================ random weights of the real shape
@pytest.mark.parametrize(
    "name, params",
    [("llama3_8b", 8_030_261_248), ("qwen2_5_7b", 7_615_616_512)],  # the published parameter counts
)
def test_random_init_builds_the_published_architecture(name, params):
    cfg = config(name, "checkpoint_dir=null", "random_init=true", "benchmark=true")
    model, hf, family = random_init.build_random_model(cfg, 0, torch.bfloat16, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == params
    assert family == {"llama3_8b": "llama", "qwen2_5_7b": "qwen2"}[name]
    assert model.max_seq_len == cfg.max_seq_len and hf["vocab_size"] == model.tok_embeddings.num_embeddings


def test_random_init_config_changes_the_shape_and_is_seeded():
    cfg = config("qwen2_5_7b", "checkpoint_dir=null", "random_init=true", "benchmark=true", *TINY_SHAPE)
    a, hf, _ = random_init.build_random_model(cfg, 3, torch.float32, torch.device("cpu"))
    b, _, _ = random_init.build_random_model(cfg, 3, torch.float32, torch.device("cpu"))
    c, _, _ = random_init.build_random_model(cfg, 4, torch.float32, torch.device("cpu"))
    assert len(a.layers) == 2 and a.layers[0].attn.q_proj.bias is not None  # Qwen2: biases on q/k/v
    assert a.tok_embeddings.weight.shape == (512, 64) and hf["num_key_value_heads"] == 2
    assert torch.equal(a.layers[1].mlp.w1.weight, b.layers[1].mlp.w1.weight)
    assert not torch.equal(a.layers[1].mlp.w1.weight, c.layers[1].mlp.w1.weight)


TINY_SHAPE = [
    "random_init_config={num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2, "
    "intermediate_size: 128, vocab_size: 512}"
]


@pytest.mark.parametrize(
    "args, message",
    [
        (["random_init=true"], "random_init=true trains random weights"),
        (["random_init=true", "benchmark=true"], "checkpoint_dir=/tmp/Meta-Llama-3-8B-Instruct names real ones"),
        (["synthetic_data=true"], "synthetic_data trains on random tokens: it needs benchmark=true"),
        (["random_init_config={hidden_size: 8}"], "random_init_config changes the random architecture"),
        (["benchmark=true", "resume_from=latest"], "benchmark=true starts a fresh run and saves none"),
        (["benchmark=true", "zeroing_steps=0"], "benchmark_warmup_steps=1 leaves no measured step of max_steps=1"),
        (["benchmark=true", "benchmark_warmup_steps=-1"], "benchmark_warmup_steps=-1 is invalid"),
        (["benchmark=maybe"], "benchmark='maybe' is invalid"),
        (["benchmark=true", "synthetic_data={min_tokens: 9, max_tokens: 3}"], "2 <= min <= max"),
        (["benchmark=true", "synthetic_data={min: 9}"], "synthetic_data="),
        (
            ["checkpoint_dir=null", "random_init=true", "benchmark=true", "hf_repo=org/unknown"],
            "hf_repo='org/unknown' is not one this recipe knows",
        ),
        (
            ["checkpoint_dir=null", "random_init=true", "benchmark=true", "random_init_config={hidden_size: 100}"],
            "random_init_config: config.json: hidden_size 100 must be a multiple of num_attention_heads 32",
        ),
    ],
)
def test_benchmark_settings_are_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    """`tune run dms_retrofit --config llama3_8b max_steps=1 ARGS` exits 2 with `message`, no traceback, nothing written."""
    import dms_retrofit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dms_retrofit", "--config", "llama3_8b", "max_steps=1", *args])
    with pytest.raises(SystemExit) as e:
        dms_retrofit.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_benchmark_is_off_by_default_in_every_packaged_config():
    for name in ("tiny", "llama3_8b", "qwen2_5_7b", "smollm2_135m"):
        s = random_init.benchmark_settings(config(name))
        assert s == random_init.BenchmarkSettings(), name


# ============================================================================ synthetic packed rows
def test_synthetic_documents_pack_into_rows_with_document_ids():
    docs = random_init.SyntheticDocuments(vocab_size=100, count=40, min_tokens=5, max_tokens=30, seed=7)
    again = random_init.SyntheticDocuments(vocab_size=100, count=40, min_tokens=5, max_tokens=30, seed=7)
    lengths = [len(docs[i]["tokens"]) for i in range(40)]
    assert all(5 <= n <= 30 for n in lengths) and len(set(lengths)) > 5
    assert all((docs[i]["tokens"] == again[i]["tokens"]).all() for i in range(40))
    assert all(0 <= docs[i]["tokens"].min() and docs[i]["tokens"].max() < 100 for i in range(40))
    with pytest.raises(IndexError):
        docs[40]
    packed = dms_data.PackedDocuments(docs, 64, pad_id=0, split_across_rows=True, progress=False)
    # document boundaries where the hand-summed lengths say, rows cut every 64 tokens
    starts, total = set(), 0
    for n in lengths:
        starts.add(total)
        total += n
    cuts = starts | set(range(0, total, 64))
    for r in range(len(packed) - 1):  # the last row is padded
        row = packed[r]
        ids = row["doc_ids"]
        expected = [t for t in range(r * 64 + 1, (r + 1) * 64) if t in cuts]
        found = [r * 64 + int(i) for i in torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1]
        assert found == expected, r
        assert bool(row["valid"].all())


# ============================================================================ the step-time split
def test_step_timer_splits_a_step_by_its_marks():
    timer = timing.StepTimer(torch.device("cpu"))
    plan = [("data", 0.01), ("teacher_forward", 0.03), ("student_forward", 0.05), ("distillation_forward", 0.02)]
    plan += [("lm_loss_log", 0.0), ("forward", 0.0), ("backward", 0.04), ("bookkeeping", 0.0), ("optimizer", 0.02)]
    for step in range(2):
        timer.start_step()
        for name, seconds in plan:
            time.sleep(seconds)
            timer.mark(name)
        x = torch.ones(3, requires_grad=True)
        y = x * 2
        timer.mark_on_grad(y, "distillation_backward")
        time.sleep(0.01)
        y.sum().backward()
        timer.mark("report")
        timer.end_step(tokens=1000, measured=step > 0)
    s = timing.summary(timer.steps)
    assert s["measured_steps"] == 1 and s["tokens_per_step"] == 1000 and s["split_kind"] == "eager"
    ms = s["split_ms"]
    for group, expected in (("teacher_forward", 30), ("student_forward", 50), ("student_backward", 40)):
        assert expected - 1 <= ms[group] < expected + 25, (group, ms)
    assert 30 - 1 <= ms["distillation"] < 30 + 25  # 20 ms forward + the 10 ms before its backward
    assert 20 - 1 <= ms["optimizer"] < 20 + 25
    assert abs(sum(ms.values()) / 1000 - s["step_s"]) < 0.02  # the marks cover the step
    assert s["tokens_per_s"] == pytest.approx(1000 / s["step_s"])


def test_compiled_split_and_null_timer():
    assert timing.split({"data": 1.0, "forward": 5.0, "backward": 7.0, "optimizer": 2.0, "report": 1.0}) == {
        "forward_all": 5.0,
        "backward_all": 7.0,
        "optimizer": 2.0,
        "other": 2.0,
    }
    null = timing.NullTimer()
    null.start_step()
    null.mark("x")
    null.end_step(1, True)
    assert not null.enabled and not hasattr(null, "steps")
    wall_only = timing.StepTimer(torch.device("cpu"), marks=False)
    wall_only.start_step()
    wall_only.mark("data")
    wall_only.end_step(10, True)
    assert timing.summary(wall_only.steps)["split_ms"] is None


# ============================================================================ the memory model
HF_8B = random_init.ARCHITECTURES["meta-llama/Meta-Llama-3-8B-Instruct"]


def test_prior_of_the_8b_model():
    """18 bytes per parameter (fp32 weights, grads, Adam; bf16 teacher) on one GPU; sharded over two GPUs
    the 16 bytes halve and the teacher stays whole; a frozen bf16 base is 2 bytes per parameter."""
    n = 8_030_261_248
    one = memory_fit.prior(HF_8B, "all", 1)
    two = memory_fit.prior(HF_8B, "all", 2)
    kd = 2 * 2 * 1024 * 128256 * 4
    assert one.fixed_bytes == pytest.approx(18 * n + kd, rel=1e-6)
    assert 10 * n < two.fixed_bytes < 11 * n  # 8 + 2 bytes, plus gathered units
    adapter = memory_fit.prior(HF_8B, "adapter", 1)
    assert adapter.fixed_bytes == pytest.approx(2 * n + kd + 16 * 32 * (4096 * 8 + 4096), rel=1e-6)
    assert memory_fit.prior(HF_8B, "adapter_nf4").fixed_bytes < memory_fit.prior(HF_8B, "adapter_int8").fixed_bytes
    assert adapter.fixed_bytes < memory_fit.prior(HF_8B, "adapter_int8").fixed_bytes + n  # int8 saves ~1 B/param
    # bf16 activations with checkpointing: one saved input per layer plus one layer's working set (input, q, k and
    # v, attention output, MLP hidden x 3), the two last hidden states, decision logits and noise, per token
    ckpt = memory_fit.prior(HF_8B, "adapter", activation_checkpointing=True).per_token_bytes
    full = memory_fit.prior(HF_8B, "adapter", activation_checkpointing=False).per_token_bytes
    assert ckpt == pytest.approx(2 * 4096 * 32 + 2 * (4096 + 4096 + 2 * 1024 + 4096 + 3 * 14336) + 4 * 4096 + 8 * 256)
    assert full == pytest.approx(32 * 2 * (4096 + 4096 + 2 * 1024 + 4096 + 3 * 14336) + 4 * 4096 + 8 * 256)
    with pytest.raises(ValueError, match="variant 'both'"):
        memory_fit.prior(HF_8B, "both")


def records(a_gib, b_kib, sizes, noise=(), **key):
    base = dict(shape="s", variant="adapter", world_size=1, activation_checkpointing=True, compile=False) | key
    out = []
    for i, (T, B) in enumerate(sizes):
        peak = a_gib + b_kib * T * B / 2**20 + (noise[i] if i < len(noise) else 0.0)
        out.append(dict(base, seq_len=T, batch_size=B, peak_reserved_GiB=peak))
    return out


def test_fit_recovers_known_coefficients_and_reports_its_error():
    rs = records(20.0, 300.0, [(8192, 1), (16384, 1), (32768, 1), (32768, 2)], noise=[0.2, -0.2, 0.1, -0.1])
    rs += records(0, 0, [(131072, 1)], oom=True)  # ran out of memory: not fitted, checked against the capacity
    rs += records(5.0, 100.0, [(8192, 1)], variant="adapter_nf4", prior_per_token_bytes=100 * 1024)
    fits = memory_fit.fit(rs, capacity_GiB=40.0)
    f = fits[("s", "adapter", 1, True, False)]
    assert f.model.fixed_bytes / 2**30 == pytest.approx(20.0, abs=0.5)
    assert f.model.per_token_bytes / 1024 == pytest.approx(300.0, rel=0.02)
    assert 0 < f.max_rel_error < 0.02 and len(f.points) == 4 and f.refuted == []  # 131072 tokens: ~57 GiB > 40
    one = fits[("s", "adapter_nf4", 1, True, False)]  # one size: the prior's slope, the fixed part fitted
    assert one.model.per_token_bytes == 100 * 1024 and one.model.fixed_bytes / 2**30 == pytest.approx(5.0)
    # an OOM where the fit says it fits refutes it
    assert memory_fit.fit(rs, capacity_GiB=80.0)[("s", "adapter", 1, True, False)].refuted == [131072]
    # the table entries are Python literals that lookup() reads back as FITTED
    table = {}
    for line in memory_fit.table_lines(fits):
        table.update(eval("{" + line.strip().rstrip(",") + "}"))
    hf = {**HF_8B}
    key = (memory_fit.shape_key(hf), "adapter", 1, True, False)
    table[key] = table.pop(("s", "adapter", 1, True, False))
    m = memory_fit.lookup(hf, "adapter", 1, True, False, table=table)
    assert m.kind == "FITTED" and m.predict(0) == pytest.approx(f.model.fixed_bytes, rel=1e-4)
    assert memory_fit.lookup(hf, "adapter", 1, True, True, table=table).kind == "ESTIMATE"  # compiled: not fitted
    assert "max error" in memory_fit.report(fits) and "measured" in memory_fit.report(fits)


def test_shipped_coefficients_reproduce_the_recorded_h200_peaks():
    """The COEFFICIENTS the recipe prints from are checked against the raw H200 records they came from
    (benchmarks/results/): every measured peak within 2.5%, and every probe that ran out of memory predicted
    beyond the card (the fitted keys) - so a wrong entry or a mistyped slope fails here."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    files = [root / "h200_2026-11-30_night" / f"fit_{v}.json" for v in ("adapter", "int8", "nf4", "all")]
    files += [root / "h200_2026-11-30_night" / "br_compile.json"]
    files += [root / "h200_2026-11-30_evening" / f for f in ("bench_retrofit_x2.json", "br_nf4.json", "br_qwen.json")]
    records = [r for f in files for r in json.loads(f.read_text())["records"]]
    hf = {m: random_init.architecture(OmegaConf.load(CONFIG_DIR / f"{m}.yaml")) for m in ("llama3_8b", "qwen2_5_7b")}
    checked = ooms = 0
    for r in records:
        m = memory_fit.lookup(
            hf[r["model"]], r["variant"], r["world_size"], r["activation_checkpointing"], r["compile"]
        )
        tokens = r["seq_len"] * r["batch_size"]
        if r.get("oom"):
            if (memory_fit.shape_key(hf[r["model"]]), r["variant"], 1, True, False) in memory_fit.COEFFICIENTS:
                assert m.predict(tokens) > 139.8 * 2**30, (r["variant"], tokens, m.predict(tokens) / 2**30)
                ooms += 1
            continue
        assert m.kind == "FITTED", (r["variant"], r["world_size"], r["compile"])
        assert m.predict(tokens) / 2**30 == pytest.approx(r["peak_reserved_GiB"], rel=0.025), (r["variant"], tokens)
        checked += 1
    assert checked >= 17 and ooms >= 6


def test_max_tokens_is_the_inverse_of_predict():
    m = memory_fit.MemoryModel(10 * 2**30, 300 * 1024, "FITTED", "x")
    n = m.max_tokens(100 * 2**30)
    assert m.predict(n) <= 100 * 2**30 < m.predict(n + 1)
    assert m.max_tokens(5 * 2**30) == 0


# ============================================================================ benchmarks/bench_retrofit.py
def test_limit_search_finds_the_largest_fitting_value():
    bench = bench_module()
    probes = []

    def fits(v):
        probes.append(v)
        return v <= 50_000

    assert bench.limit_search(fits, 8192, 40_000, 4096) == 49152
    assert len(probes) <= 6 and all(v % 4096 == 0 for v in probes)
    probes.clear()
    assert bench.limit_search(fits, 32768, 0, 4096, known_bad=65536) == 49152  # a bad guess, a known failure
    probes.clear()
    assert bench.limit_search(fits, 1, 100, 1, max_probes=40) == 50_000
    assert 49_000 < bench.limit_search(fits, 1, 100, 1, max_probes=30) <= 50_000  # stopped early: the best seen
    assert bench.limit_search(lambda b: b <= 3, 1, 2, 1) == 3  # micro-batches


def test_fit_limits_reports_the_limits_and_what_bounds_them(capsys):
    """--fit against a fake GPU whose peak is 10 GiB + 0.5 MiB/token on 100 GiB (limit: 184,320 tokens):
    the longest row and the micro-batch found, each with the probe that bounds it, or marked a lower bound
    when the probes ran out before one ran out of memory."""
    import argparse

    bench = bench_module()

    class FakeRunner:
        def __init__(self):
            self.records, self.saved = [], {}

        def point(self, model, variant, *, seq_len, batch, tag, **kw):
            tokens = seq_len * batch
            peak = 10.0 + tokens * 0.5 / 1024
            r = dict(
                shape="s", model=model, variant=variant, world_size=1, activation_checkpointing=True, compile=False,
                seq_len=seq_len, batch_size=batch, device_total_GiB=100.0, oom=peak > 100.0,
                returncode=1 if peak > 100.0 else 0,
            )  # fmt: skip
            if not r["oom"]:
                r["peak_reserved_GiB"] = peak
            self.records.append(r)
            return r

        def save(self, extra=None):
            self.saved = extra or {}

    def limits(probes):
        args = argparse.Namespace(
            models=["llama3_8b"], variants=["adapter"], ckpt=[True], compile=[False], fit_lengths=[32768, 65536],
            fit_granularity=16384, fit_batch_len=32768, fit_probes=probes, capacity_gib=None,
        )  # fmt: skip
        runner = FakeRunner()
        bench.fit_limits(args, runner)
        return runner.saved["limits"][0]

    line = limits(6)
    assert "longest row at batch 1: 180,224 tokens (196,608 did not fit)" in line, line
    assert "largest micro-batch of 32,768-token rows: 5 (6 did not fit)" in line, line
    assert "(a lower bound" in limits(0), limits(0)  # no search probe: 65,536 fits, nothing above it was tried
    assert "10.00 GiB + 512.00 KiB/token" in capsys.readouterr().out  # the fitted model, printed


def test_tiny_bench_runs_the_recipe_and_saves_no_model(tmp_path):
    bench = bench_module()
    out = tmp_path / "out.json"
    argv = ["--tiny", "--models", "llama3_8b", "--variants", "adapter", "--steps", "2", "--warmup", "1"]
    assert bench.main(argv + ["--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["records"]
    assert r["returncode"] == 0 and not r["oom"] and r["world_size"] == 1
    assert r["shape"] == "llama-L2-d64-h4/2-ff128-V512-untied" and r["variant"] == "adapter"
    assert r["rank0"]["measured_steps"] == 2 and r["rank0"]["tokens_per_step"] == 128  # one 128-token row a step
    assert r["tokens_per_s_per_gpu"] == pytest.approx(128 / r["step_s"], rel=1e-6)
    split = r["rank0"]["split_ms"]
    assert set(split) == set(timing.EAGER_GROUPS) and split["teacher_forward"] > 0 and split["student_backward"] > 0
    assert sum(split.values()) / 1000 == pytest.approx(r["step_s"], rel=0.1)
    assert r["peak_reserved_GiB"] > 0.05
    run = tmp_path / "work" / "llama3_8b-adapter-ckpt1-compile0-T128-B1-n1"
    assert sorted(p.name for p in run.iterdir()) == [
        "benchmark.json",
        "logs",
        "retrofit_run.json",
        "torchtune_config.yaml",
    ]
    assert "benchmark.json" in json.loads((run / "retrofit_run.json").read_text())["written"]
    assert "| llama3_8b | adapter | 1 | on | off | 128 x 1 |" in bench.summary_table([r])


def test_bench_fsdp2_on_two_cpu_ranks(tmp_path):
    """--nproc 2: tune run's torchrun, FSDP2 over two gloo ranks, every weight training from random init."""
    bench = bench_module()
    out = tmp_path / "out.json"
    argv = ["--tiny", "--nproc", "2", "--models", "qwen2_5_7b", "--variants", "all", "--steps", "1"]
    assert bench.main(argv + ["--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["records"]
    assert r["world_size"] == 2 and len(r["ranks"]) == 2 and r["variant"] == "all"
    assert all(x["tokens_per_s"] > 0 for x in r["ranks"]) and r["rank0"]["split_ms"]["optimizer"] > 0


def test_recipe_benchmark_on_the_tiny_config_writes_no_checkpoint(tmp_path):
    """benchmark=true with real data (the tiny config's): no step folders even with save_every_n_steps."""
    p = run_recipe(tmp_path, "--config", "tiny", "benchmark=true", "max_steps=2", "save_every_n_steps=1")
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "dms_runs" / "tiny"
    assert not (out / "final").exists() and not list(out.glob("step_*")) and not (out / "kept_heatmap.png").exists()
    record = json.loads((out / "benchmark.json").read_text())
    assert record["random_init"] is False and record["rank0"]["measured_steps"] == 1
    assert "saved" not in p.stdout
