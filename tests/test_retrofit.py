"""`tune run dms_retrofit`: the recipe end to end on CPU (the `tiny` config), its checkpoints, resume,
FSDP2 on two CPU ranks, errors; plus the data pieces it is built from (dms_flex.data).

The runs are subprocesses started from a temporary folder, as a user runs them.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_flex import data as dms_data
from dms_flex.data import reasoning as reasoning_mod
from dms_flex.stats import kept_fraction

from .helpers import log_lines, run_recipe, weights

HAVE_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None


# ============================================================================ the tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("user_folder")
    p = run_recipe(cwd, "--config", "tiny")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return cwd / "dms_runs" / "tiny", p


def test_tiny_config_runs_from_any_folder(tiny_run):
    out, p = tiny_run
    assert p.seconds < 120, f"tune run dms_retrofit --config tiny took {p.seconds:.0f}s"
    assert (out / "final" / "config.json").is_file() and (out / "step_000004" / "recipe_state.pt").is_file()
    assert (out / "kept_heatmap.png").stat().st_size > 1000
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert (
        cfg["dms_window_size"],
        cfg["dms_decision"],
        cfg["dms_alpha_scale"],
        cfg["dms_initial_alpha_offset"],
        cfg["dms_cr"],
    ) == (16, "adapter", 100.0, 5.0, 4.0)
    rows = [vals for step, vals in log_lines(out) if "kd_loss" in vals]
    assert len(rows) == 8
    for key in (
        "kd_loss",
        "compression_loss",
        "lm_loss",
        "target_cr",
        "achieved_cr",
        "kept_layer_00",
        "kept_layer_01",
        "grad_norm",
        "lr",
    ):
        assert key in rows[-1], key
    assert [r["target_cr"] for r in rows] == pytest.approx([1 + 3 * s / 8 for s in range(8)])  # CR 1 -> 4 linear
    assert "before training (hard decisions): CR" in p.stdout and "saved final model" in p.stdout
    # measured peak memory (CPU: the process's peak RSS; a python process with torch holds well over 50 MiB)
    rss = [r["peak_process_rss_GiB"] for r in rows]
    assert 0.05 < rss[0] <= rss[-1] < 64 and "MEASURED peak memory of training on this rank: process_rss" in p.stdout


def test_compression_loss_raises_the_achieved_cr(tiny_run):
    """tiny asks for CR 4 within 8 steps; the zero-initialised adapter starts at exactly CR 1."""
    out, _ = tiny_run
    evals = [vals["eval_cr"] for _, vals in log_lines(out) if "eval_cr" in vals]
    assert evals[0] == 1.0
    assert evals[-1] > 1.1, evals


def test_checkpoint_loads_and_reproduces_the_measured_cr(tiny_run):
    """load_dms_model gets the trained adapter; its hard decisions on the recipe's eval rows give the
    CR the recipe logged (same weights, same rule)."""
    from dms_flex.checkpoints import load_dms_model
    from dms_flex.retrofit.metrics import kept_tokens
    from dms_flex.stats import CompressionReport
    from dms_flex.torchtune_model import forward_train

    out, _ = tiny_run
    dm = load_dms_model(out / "final")
    assert dm.dms_trained and dm.dms.decision == "adapter" and dm.dms.window == 16 and dm.tokenizer is not None
    from tests.helpers import eval_batch

    batch = eval_batch()
    with torch.no_grad():
        evicted = forward_train(dm.model, batch["tokens"], doc_ids=batch["doc_ids"], training=False).evicted
    kept, seen = kept_tokens(evicted, batch["doc_ids"], batch["valid"], 16)
    logged = [vals["eval_cr"] for _, vals in log_lines(out) if "eval_cr" in vals][-1]
    assert CompressionReport(per_layer_head=kept / seen).ratio == pytest.approx(logged, rel=1e-6)


def test_checkpoint_runs_in_the_generate_cli(tiny_run):
    out, _ = tiny_run
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dms_flex.generate",
            "--checkpoint",
            str(out / "final"),
            "--prompt",
            "def load(",
            "--max-new-tokens",
            "8",
            "--max-seq-len",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"CR \d+\.\d+x", p.stdout), p.stdout


# ============================================================================ resume
def test_resume_equals_uninterrupted_run(tmp_path):
    """A user yaml (a path) plus key=value overrides. The data (bisect.py: 8 rows of 400 tokens, 4
    batches) ends its first epoch exactly at the checkpoint; gradient accumulation and the borrowed
    variant are on; the resumed half also recomputes activations (checkpointing)."""
    import yaml

    from dms_flex.retrofit.config_checks import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    cfg["dataset"]["modules"] = ["bisect"]
    cfg["max_seq_len"] = cfg["model"]["max_seq_len"] = 400
    cfg["dms"]["decision"] = "borrowed"
    user_yaml = tmp_path / "my_retrofit.yaml"
    user_yaml.write_text(yaml.safe_dump(cfg))
    common = ["--config", str(user_yaml), "max_steps=4", "save_every_n_steps=2", "gradient_accumulation_steps=2"]

    a = run_recipe(tmp_path, *common, "output_dir=straight")
    assert a.returncode == 0, a.stderr[-3000:]
    assert "8 rows of 400" in a.stdout and "2.0 epoch(s)" in a.stdout
    # "latest" finds the mid-run checkpoint in output_dir
    shutil.copytree(tmp_path / "straight" / "step_000002", tmp_path / "resumed" / "step_000002")
    # activation checkpointing recomputes the same numbers: the resumed half runs with it
    b = run_recipe(
        tmp_path, *common, "output_dir=resumed", "resume_from=latest", "enable_activation_checkpointing=true"
    )
    assert b.returncode == 0, b.stderr[-3000:]
    assert "resumed from" in b.stdout and "at step 2" in b.stdout

    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [v for s, v in log_lines(tmp_path / "straight") if s >= 3 and "kd_loss" in v]
    lb = [v for s, v in log_lines(tmp_path / "resumed") if s >= 3 and "kd_loss" in v]
    assert [(r["kd_loss"], r["compression_loss"], r["achieved_cr"]) for r in la] == [
        (r["kd_loss"], r["compression_loss"], r["achieved_cr"]) for r in lb
    ]
    assert not list((tmp_path / "straight" / "step_000002").glob(".*tmp*"))


def test_fsdp2_on_two_cpu_ranks_and_its_resume(tmp_path):
    """torchrun with 2 gloo ranks: the sharded path (FSDP2 units, rank-0 load and broadcast, gathered
    checkpoints, sharded optimizer state) trains, saves, and resumes exactly."""
    common = ["--config", "tiny", "max_steps=2", "save_every_n_steps=1", "dms.decision=borrowed"]
    a = run_recipe(tmp_path, *common, "output_dir=fsdp", nproc=2)
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-4000:]
    assert "2 rank(s)" in a.stdout
    b = run_recipe(tmp_path, *common, "output_dir=fsdp_resumed", "resume_from=fsdp/step_000001", nproc=2)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-4000:]
    wa, wb = weights(tmp_path / "fsdp" / "final"), weights(tmp_path / "fsdp_resumed" / "final")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ============================================================================ errors
def test_missing_weights_say_where_and_how(tmp_path):
    if Path("/tmp/Meta-Llama-3-8B-Instruct/config.json").exists():
        pytest.skip("the Llama-3-8B weights are here")
    p = run_recipe(tmp_path, "--config", "llama3_8b")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert "/tmp/Meta-Llama-3-8B-Instruct" in p.stderr
    assert "tune download meta-llama/Meta-Llama-3-8B-Instruct --output-dir /tmp/Meta-Llama-3-8B-Instruct" in p.stderr
    assert "checkpoint_dir=" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["dms.window=-1"], "DMSConfig.window=-1 is invalid"),
        (["dms.decision=neuron"], "DMSConfig.decision='neuron' is invalid"),
        (["dms.final_cr=0.5"], "DMSConfig.final_cr=0.5 is invalid"),
        (["dms.windw=4"], "unknown DMSConfig field(s) ['windw']"),
        (["max_steps=0"], "max_steps=0 is invalid"),
        (["dtype=fp16"], "dtype='fp16' is invalid"),
        (["max_step=3"], "unknown config key 'max_step'"),
        (["train_adapter_only=true", "dms.decision=borrowed"], "train_adapter_only=true needs dms.decision=adapter"),
        (["resume_from=nowhere"], "holds no recipe_state.pt"),
        (["optimizer._component_=torch.optim.Adamm"], "cannot build optimizer"),
        (["dataset=[${code},${prose}]"], "not valid YAML (while parsing a flow sequence"),
    ],
)
def test_bad_config_values_are_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    assert_one_clear_message(args, message, tmp_path, monkeypatch, capsys)


def assert_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    """`tune run dms_retrofit --config tiny max_steps=1 ARGS` exits 2 with `message` and no traceback."""
    import dms_retrofit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dms_retrofit", "--config", "tiny", "max_steps=1", *args])
    with pytest.raises(SystemExit) as e:
        dms_retrofit.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_names_map_to_packaged_files(tmp_path):
    from dms_flex.retrofit import config_checks

    packaged = config_checks.packaged_configs()
    for name in ("llama3_8b", "llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "qwen2_5_7b", "smollm2_135m", "tiny"):
        assert name in packaged
        argv = config_checks.map_config_argument(["dms_retrofit", "--config", name, "a=1"])
        assert argv[2] == str(config_checks.CONFIG_DIR / f"{name}.yaml") and argv[3] == "a=1"
    own = tmp_path / "tiny"  # an existing file wins over a packaged name
    own.write_text("x: 1")
    assert config_checks.map_config_argument(["r", "--config", str(own)])[2] == str(own)
    with pytest.raises(config_checks.RecipeError, match="not a packaged config; packaged: llama3_1_8b"):
        config_checks.map_config_argument(["r", "--config", "llama9_70b"])
    with pytest.raises(config_checks.RecipeError, match="no such file"):
        config_checks.map_config_argument(["r", "--config", "missing/own.yaml"])


def test_every_packaged_config_validates():
    from omegaconf import OmegaConf

    from dms_flex.retrofit import config_checks
    from dms_flex.config import DMSConfig

    for name in config_checks.packaged_configs():
        cfg = OmegaConf.load(config_checks.CONFIG_DIR / f"{name}.yaml")
        config_checks.validate_config(cfg)
        dms = DMSConfig.from_dict(OmegaConf.to_container(cfg.dms))
        if name != "tiny":
            o = cfg.optimizer
            assert (tuple(o.betas), o.weight_decay, cfg.clip_grad_norm, cfg.dtype) == ((0.9, 0.95), 0.0, 1.0, "bf16")
            assert cfg.lr_scheduler is None
        if name in (
            "llama3_8b",
            "llama3_1_8b",
            "qwen2_5_7b",
        ):  # NVIDIA's 8B recipe (docs/design.md, "Losses and schedule")
            assert (dms.initial_cr, dms.final_cr, dms.final_step, dms.window, cfg.max_steps, cfg.optimizer.lr) == (
                1.0,
                16.0,
                510,
                512,
                544,
                3e-5,
            )


# ============================================================================ data pieces
def test_packed_rows_hold_documents_targets_and_padding():
    docs = dms_data.DocumentList(
        [
            {"tokens": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]},
            {"tokens": [6, 7, 8], "labels": [-100, 7, 8]},  # first token masked (a prompt)
            {"tokens": [9, 10, 11, 12, 13, 14, 15], "labels": [9, 10, 11, 12, 13, 14, 15]},
        ]
    )
    rows = dms_data.PackedDocuments(docs, 6, pad_id=0, split_across_rows=False)
    assert [r for r in rows.rows] == [[(0, 5)], [(5, 8)], [(8, 14)], [(14, 15)]]
    r = rows[1]
    assert r["tokens"].tolist() == [6, 7, 8, 0, 0, 0]
    assert r["targets"].tolist() == [7, 8, -100, -100, -100, -100]
    assert r["doc_ids"].tolist() == [0, 0, 0, 1, 1, 1] and r["valid"].tolist() == [True] * 3 + [False] * 3

    split = dms_data.PackedDocuments(docs, 6, pad_id=0, split_across_rows=True)
    assert [len(split), split.real_tokens] == [3, 15]
    r = split[0]
    assert r["tokens"].tolist() == [1, 2, 3, 4, 5, 6] and r["doc_ids"].tolist() == [0] * 5 + [1]
    # a document's last token predicts nothing; a masked label is no target
    assert r["targets"].tolist() == [2, 3, 4, 5, -100, -100]
    assert split[1]["targets"].tolist()[:2] == [8, -100]
    assert len(dms_data.PackedDocuments(docs, 6, max_rows=2)) == 2


def test_kept_tokens_counts_every_document_as_its_own_sequence():
    from dms_flex.retrofit.metrics import kept_tokens

    g = torch.Generator().manual_seed(0)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 12 + [1] * 8])
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, 16:] = False  # padding is the last "document"
    evicted = [torch.rand(2, 3, 20, generator=g) > 0.4 for _ in range(2)]
    kept, seen = kept_tokens(evicted, doc_ids, valid, window=2)
    assert seen == 7 + 9 + 12 + 8
    for layer, ev in enumerate(evicted):
        want = torch.zeros(3)
        for b, s, n in ((0, 0, 7), (0, 7, 9), (1, 0, 12), (1, 12, 8)):
            want += kept_fraction(ev[b : b + 1, :, s : s + n], 2)[0] * n
        assert torch.allclose(kept[layer], want)


def test_tokenizers_speak_torchtune():
    from torchtune.data import Message

    tok = dms_data.byte_tokenizer()
    ids = tok.encode("héllo", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "héllo"
    msgs = [Message("user", "2+2?", masked=True), Message("assistant", "4")]
    tokens, mask = tok.tokenize_messages(msgs)
    text = tok.decode(tokens, skip_special_tokens=False)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    n_user = len(tok.hf("<|im_start|>user\n2+2?<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert mask == [True] * n_user + [False] * (len(tokens) - n_user)
    out = tok({"messages": msgs})
    assert out["tokens"] == tokens and out["mask"] == mask
    with pytest.raises(FileNotFoundError):
        dms_data.hf_tokenizer("/nonexistent/folder")
    assert dms_data.hf_tokenizer("/nonexistent/folder", fallback="bytes").vocab_size == 259


@pytest.mark.skipif(not HAVE_REASONING_GYM, reason=f"reasoning-gym is not installed ({dms_data.REASONING_GYM_HINT})")
def test_reasoning_set_is_built_by_the_teacher_once(tiny_run, tmp_path):
    """Conversations of reasoning-gym problems answered by a model (here the tiny retrofit); cached."""
    out, _ = tiny_run
    kw = dict(
        path=tmp_path / "r.jsonl",
        num_problems=5,
        problems_per_conversation=2,
        max_new_tokens=4,
        batch_size=2,
        tasks=["chain_sum", "basic_arithmetic"],
        instruction="A:",
    )
    path = dms_data.build_reasoning_set(out / "final", **kw)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3  # 5 problems, 2 per conversation
    for r in rows:  # the tiny model's 256-token context may end a conversation after its first turn
        n = len(r["scores"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * n and 1 <= n <= 2
        assert len(r["tasks"]) == len(r["references"]) == n
    assert rows[0]["tasks"][0] == "chain_sum" and "A:" in rows[0]["messages"][0]["content"]
    stamp = path.stat().st_mtime_ns
    assert dms_data.build_reasoning_set(out / "final", **kw) == path and path.stat().st_mtime_ns == stamp
    ds = dms_data.reasoning_dataset(dms_data.byte_tokenizer(), out / "final", **kw)
    assert len(ds) == 3 and all(t != -100 for t in ds[0]["labels"])  # train_on_input: every token distilled
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        dms_data.build_reasoning_set(out / "final", **{**kw, "tasks": ["no_such_task"]})


@pytest.mark.skipif(not HAVE_REASONING_GYM, reason=f"reasoning-gym is not installed ({dms_data.REASONING_GYM_HINT})")
def test_a_reasoning_set_built_elsewhere_is_adopted_without_generating(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    kw = dict(num_problems=5, problems_per_conversation=2, max_new_tokens=4, batch_size=2, tasks=["chain_sum"])
    built = dms_data.build_reasoning_set(out / "final", path=tmp_path / "elsewhere.jsonl", **kw)

    def no_teacher(*a, **k):
        raise AssertionError("an adopted set must not be generated")

    monkeypatch.setattr(reasoning_mod, "_answer_conversations", no_teacher)
    here = dms_data.build_reasoning_set(out / "final", path=tmp_path / "here.jsonl", adopt=str(built), **kw)
    assert here.read_text() == built.read_text()
    assert dms_data.build_reasoning_set(out / "final", path=tmp_path / "here.jsonl", **kw) == here  # cached now
    with pytest.raises(ValueError, match=r"built with other settings \(num_problems=5; here: num_problems=7\)"):
        dms_data.build_reasoning_set(
            out / "final", path=tmp_path / "x.jsonl", adopt=str(built), **{**kw, "num_problems": 7}
        )
    bare = tmp_path / "bare.jsonl"  # no meta file beside it: the rows themselves are checked
    bare.write_text(built.read_text())
    with pytest.raises(ValueError, match="3 conversations do not match these settings .7 problems"):
        dms_data.build_reasoning_set(
            out / "final", path=tmp_path / "x.jsonl", adopt=str(bare), **{**kw, "num_problems": 7}
        )
    lines = built.read_text().splitlines()  # adopting over a current set replaces it
    bare.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    again = dms_data.build_reasoning_set(out / "final", path=tmp_path / "here.jsonl", adopt=str(bare), **kw)
    assert again.read_text() == bare.read_text() != built.read_text()
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="line 1 is not a reasoning-set conversation"):
        dms_data.build_reasoning_set(out / "final", path=tmp_path / "y.jsonl", adopt=str(tmp_path / "bad.jsonl"), **kw)
    with pytest.raises(FileNotFoundError, match="no such file"):
        dms_data.build_reasoning_set(out / "final", path=tmp_path / "z.jsonl", adopt=str(tmp_path / "none"), **kw)


@pytest.mark.skipif(not HAVE_REASONING_GYM, reason=f"reasoning-gym is not installed ({dms_data.REASONING_GYM_HINT})")
def test_solved_reasoning_set_is_the_evaluations_format_without_its_problems(capsys):
    """Many-shot conversations of solved problems: every problem of the seed range, in order, but those whose
    question the evaluation asks or shows (dropped), as the evaluation renders its solved examples; within
    max_shots and max_tokens."""
    import reasoning_gym

    from dms_flex.eval import metrics as eval_metrics
    from dms_flex.eval import reasoning as eval_reasoning

    tok = dms_data.byte_tokenizer()
    tasks, seed, per_task, held = ["chain_sum", "basic_arithmetic"], 5000, 200, 300
    ds = dms_data.solved_reasoning_dataset(
        tok, tasks=tasks, problems_per_task=per_task, max_shots=8, max_tokens=1200, seed=seed, held_out=held
    )
    want, dropped = [], 0  # independent reference: the pool minus the evaluation's questions, in order
    for task in tasks:
        ev = {
            e["question"]
            for s in (eval_reasoning.REASONING_SEED, eval_reasoning.REASONING_SEED + 1)
            for e in reasoning_gym.create_dataset(task, size=held, seed=s)
        }
        pool = list(reasoning_gym.create_dataset(task, size=per_task, seed=seed))
        want += [(e["question"], str(e["answer"])) for e in pool if e["question"] not in ev]
    dropped = len(tasks) * per_task - len(want)
    assert dropped >= 1  # the text check bites on these settings (chain_sum repeats a question)
    assert f"left out {dropped} problem(s) whose question the evaluation holds out" in capsys.readouterr().out
    instr = re.escape(eval_reasoning.REASONING_INSTRUCTION)
    turn = re.compile(
        rf"<\|im_start\|>user\n(.*?)\n{instr}<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>", re.S
    )
    got = []
    for doc in ds.docs:
        assert doc["labels"] == doc["tokens"] and len(doc["tokens"]) <= 1200
        pairs = turn.findall(tok.decode(doc["tokens"], skip_special_tokens=False))
        assert 1 <= len(pairs) <= 8
        got += pairs
    assert got == want
    # the evaluation's prompt of an item begins with exactly this rendering of its solved examples
    item = eval_reasoning.reasoning_items(["basic_arithmetic"], per_task=1, shots=3)[0]
    prompt = eval_metrics.render_reasoning(tok.hf, item)
    shots = eval_reasoning.render_solved(tok.hf, item.shots)
    assert prompt[: len(shots)] == shots and len(prompt) > len(shots)
    with pytest.raises(ValueError, match="meet the evaluation's held-out seeds"):
        dms_data.solved_reasoning_dataset(tok, tasks=tasks, seed=eval_reasoning.REASONING_SEED - 10)
    with pytest.raises(ValueError, match="problems_per_task=0 is invalid"):
        dms_data.solved_reasoning_dataset(tok, problems_per_task=0)
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        dms_data.solved_reasoning_dataset(tok, tasks=["no_such_task"], problems_per_task=2)
    with pytest.raises(ValueError, match="no conversation within max_tokens=8"):
        dms_data.solved_reasoning_dataset(tok, tasks=["chain_sum"], problems_per_task=2, max_tokens=8, held_out=2)


def test_torchtune_datasets_over_local_files_pack(tmp_path):
    """The dataset components a config names (torchtune's, over local files) feed the packer."""
    from torchtune.datasets import instruct_dataset, text_completion_dataset

    tok = dms_data.byte_tokenizer()
    (tmp_path / "corpus.txt").write_text("first document\n\nstill the first\n")
    text = text_completion_dataset(tok, source="text", data_files=str(tmp_path / "corpus.txt"), sample_by="document")
    assert len(text) == 1 and tok.decode(text[0]["tokens"]) == "first document\n\nstill the first\n"
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    (tmp_path / "qa.json").write_text("\n".join(json.dumps(r) for r in rows))
    qa = instruct_dataset(
        tok,
        source="json",
        data_files=str(tmp_path / "qa.json"),
        column_map={"input": "question", "output": "answer"},
        train_on_input=False,
    )
    packed = dms_data.PackedDocuments(torch.utils.data.ConcatDataset([text, qa]), 64, pad_id=tok.pad_id)
    assert packed.documents == 3
    row = packed[0]
    targets = row["targets"][row["targets"] != -100].tolist()
    # text: every next token; instruct: only the assistant turn (train_on_input=False); the second
    # question starts at the end of this row and contributes no target here
    assert (
        tok.decode(targets, skip_special_tokens=False)
        == "first document\n\nstill the first\n<|im_end|>" + "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert row["doc_ids"][row["valid"]].unique().tolist() == [0, 1, 2] and bool(row["valid"].all())


def test_dataset_repeat_weights_the_parts_of_the_mix():
    from omegaconf import OmegaConf

    from dms_flex.retrofit.config_checks import RecipeError
    from dms_flex.retrofit.data_setup import build_training_data

    tok = dms_data.byte_tokenizer()
    base = dict(
        dataset=[
            {"_component_": "dms_flex.data.python_sources_dataset", "modules": ["bisect"]},
            {"_component_": "dms_flex.data.python_sources_dataset", "modules": ["heapq"]},
        ],
        max_seq_len=512,
        eval_batches=1,
    )
    kw = dict(total_steps=1000, grad_accum=1, batch_size=1, world_size=1, rank=0, seed=0, log=lambda m: None)
    one = build_training_data(OmegaConf.create(base), tok, **kw).packed
    heavy = build_training_data(OmegaConf.create({**base, "dataset_repeat": [3, 1]}), tok, **kw).packed
    bisect_tokens = len(dms_data.python_sources_dataset(tok, ["bisect"])[0]["tokens"])
    assert one.documents == 2 and heavy.documents == 4
    assert heavy.real_tokens == one.real_tokens + 2 * bisect_tokens
    for bad in ([3], [0, 1], [1.5, 1], "x"):
        with pytest.raises(RecipeError, match="dataset_repeat=.* is invalid: give one whole number >= 1 per"):
            build_training_data(OmegaConf.create({**base, "dataset_repeat": bad}), tok, **kw)
