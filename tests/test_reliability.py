"""Issue 17: what broke when the project was tried as a new user would. Each test here failed on the
commit before the fixes (a2eb590) and names the item it covers."""

import re
import sys
from pathlib import Path

import pytest
import torch

from dms_flex import stats
from dms_flex import torchtune_model as tm

from .helpers import teacher_forced, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[1] / "README.md"


# ============================================================================ multi-turn generation (item 2)
def _assert_transcript_matches(m, transcript, generated_at, state):
    """Every generated token is the teacher-forced argmax over the whole transcript, and the cache
    holds exactly the tokens the rule keeps of the transcript (all but the last, still pending)."""
    full = torch.tensor([transcript])
    logits, evicted = teacher_forced(m, full)
    pred = logits[0].argmax(-1)
    for i in generated_at:
        assert int(pred[i - 1]) == transcript[i], f"token {i} of {len(transcript)}"
    # the last token is pending unless the lookahead loop wrote it (every row stopped)
    written = len(transcript) - (state.pending.tokens[0] is not None)
    assert int(state.next_pos[0]) == written
    _, evicted = teacher_forced(m, full[:, :written])
    for cache, ev in zip(state.caches, evicted):
        kept = stats.kept_fraction(ev, m.dms_config.effective_window) * written
        assert torch.equal(cache.length, kept.round().long())


@pytest.mark.parametrize("lookahead", [False, True])
def test_chat_loop_of_20_turns_equals_one_teacher_forced_pass(lookahead, monkeypatch):
    """lookahead: the CUDA loop's order (the next step launched before this step's tokens are read;
    when every row has stopped, that step has already written the last token) forced on the CPU."""
    from dms_flex import stepping
    from dms_flex.generate import generate_tokens

    monkeypatch.setattr(stepping, "LOOKAHEAD_ON_CPU", lookahead)

    m = tiny_model(window=3, max_seq_len=256)
    state = tm.InferenceState(m, 1)
    g = torch.Generator().manual_seed(1)
    transcript, generated_at = [], []
    for turn in range(20):
        prompt = torch.randint(0, 64, (int(turn % 3 != 2) * 3,), generator=g).tolist()  # every third turn: empty
        if turn == 0:
            prompt = [1, 2, 3]
        res = generate_tokens(m, [prompt], state, max_new_tokens=1 + turn % 4, stop_tokens=[7] if turn % 5 == 4 else ())
        transcript += prompt
        generated_at += range(len(transcript), len(transcript) + len(res.tokens[0]))
        transcript += res.tokens[0]
    assert len(transcript) > 60
    _assert_transcript_matches(m, transcript, generated_at, state)


@pytest.mark.parametrize("lookahead", [False, True])
def test_turns_that_end_on_a_stop_token_continue_exactly(lookahead, monkeypatch):
    """Turns ending at a stop token before max_new_tokens, then more turns (with lookahead, that
    turn's last token is already in the cache and nothing is pending)."""
    from dms_flex import generate as generation
    from dms_flex import stepping

    monkeypatch.setattr(stepping, "LOOKAHEAD_ON_CPU", lookahead)
    m = tiny_model(window=3, max_seq_len=256)
    state = tm.InferenceState(m, 1)
    transcript, generated_at, early = [], [], 0
    for turn in range(10):
        prompt = [1 + turn, 2, 3] if turn % 3 != 2 else []
        stops = [5, 33, 42, 16] if turn % 2 else ()
        res = generation.generate_tokens(m, [prompt], state, max_new_tokens=6, stop_tokens=stops)
        early += res.stopped[0] and len(res.tokens[0]) < 6
        transcript += prompt
        generated_at += range(len(transcript), len(transcript) + len(res.tokens[0]))
        transcript += res.tokens[0]
        _assert_transcript_matches(m, transcript, generated_at, state)
    assert early >= 3  # the path under test was taken
    # max_new_tokens=0 keeps the sampled next token too: an empty prompt continues from it
    res0 = generation.generate_tokens(m, [[9, 8, 7]], state, max_new_tokens=0)
    assert res0.tokens == [[]]
    transcript += [9, 8, 7]
    res = generation.generate_tokens(m, [[]], state, max_new_tokens=3)
    generated_at += range(len(transcript), len(transcript) + 3)
    transcript += res.tokens[0]
    _assert_transcript_matches(m, transcript, generated_at, state)


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_batch_row_that_stopped_early_is_not_continued_silently(lookahead, monkeypatch):
    from dms_flex import stepping
    from dms_flex.generate import generate_tokens

    monkeypatch.setattr(stepping, "LOOKAHEAD_ON_CPU", lookahead)

    m = tiny_model(window=3, max_seq_len=128)
    state = tm.InferenceState(m, 2)
    prompts = [[5, 6, 7], [30, 31, 40]]  # greedy: row 0 says 1, 52, 10, ...; row 1 4, 59, 0, ... (no 52)
    res = generate_tokens(m, prompts, state, max_new_tokens=8, stop_tokens=[52])
    assert res.tokens[0] == [1, 52] and len(res.tokens[1]) == 8  # row 1 went on, row 0 got filler
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] stopped before the rest of their batch"):
        generate_tokens(m, [[1], [1]], state, max_new_tokens=2)
    # a state moved on by hand cannot take the pending tokens either
    state = tm.InferenceState(m, 1)
    generate_tokens(m, [[5, 6, 7]], state, max_new_tokens=3)
    tm.prefill(m, torch.tensor([[1, 2]]), state)
    with pytest.raises(ValueError, match="the state moved on"):
        generate_tokens(m, [[1]], state, max_new_tokens=2)
    state.reset()  # drops what is pending
    assert generate_tokens(m, [[1]], state, max_new_tokens=2).tokens[0]


# ============================================================================ the Python API in the README (item 4)
def test_readme_python_snippet_runs_as_written(monkeypatch):
    """`from dms_flex import generate` gave the CLI module once anything had imported it."""
    import torchtune.models.llama3_2 as llama3_2

    import dms_flex.generate  # noqa: F401 - the CLI module, imported first as the tests and the CLI do

    text = README.read_text()
    section = text[text.index("## Using it from Python") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)

    def small_llama3_2_1b():  # the README's model, 1.2B parameters, at a test's size (its vocabulary kept)
        from torchtune.models.llama3_2._component_builders import llama3_2

        return llama3_2(
            vocab_size=128_256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=32,
            max_seq_len=4096,
            intermediate_dim=64,
        )

    monkeypatch.setattr(llama3_2, "llama3_2_1b", small_llama3_2_1b)
    pytest.importorskip("torchao")
    scope = {}
    exec(compile(snippet, str(README), "exec"), scope)
    assert len(scope["out"].tokens[0]) == 32 and scope["state8"].caches[0].k.dtype == torch.int8


# ============================================================================ the generate CLI (item 5 and the tracebacks)
from .test_generation import tiny_hf_folder  # noqa: E402,F401 - the fixture: a tiny Llama with the SmolLM2 tokenizer


def _generate(argv, capsys):
    from dms_flex.generate import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--chat", ""], "--chat is empty"),  # ran the default poem prompt
        (["--prompt", " "], "--prompt is empty"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),  # bytes b"caf\xe9" from the shell
        (["--prompt", "x", "--cache-capacity", "0"], "--cache-capacity must be >= 1"),  # became 4,096
        (["--prompt", "x", "--cache-capacity", "big"], "expected a whole number of KV slots or 'auto', got 'big'"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1]"),  # even when greedy
        (["--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
        (["--prompt", "x", "--device", "tpu"], "--device 'tpu' is not a device"),
        (["--prompt", "x", "--heatmap", "/nonexistent/dir/x.png"], "the folder /nonexistent/dir does not exist"),
    ],
)
def test_generate_refuses_bad_arguments_before_loading(extra, message, tmp_path, capsys):
    rc, out, err = _generate(["--checkpoint", str(tmp_path / "never_read")] + extra, capsys)
    assert rc == 2 and message in err and "Traceback" not in err and not out


def test_generate_cache_overflow_and_a_context_beyond_training_are_one_line(tiny_hf_folder, capsys):
    common = [
        "--checkpoint",
        str(tiny_hf_folder),
        "--prompt",
        "Hello there, how are you today? " * 3,
        "--max-new-tokens",
        "8",
        "--window",
        "2",
    ]
    rc, out, err = _generate(common + ["--cache-capacity", "10", "--max-seq-len", "128"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert re.search(
        r"^error: .*(ran out of slots \(capacity 10|holds 10 per batch row).*--cache-capacity 10\)$", err, re.M
    )
    rc, out, err = _generate(common + ["--cache-capacity", "auto", "--max-seq-len", "128"], capsys)  # grows: no error
    assert rc == 0 and "Traceback" not in err
    rc, out, err = _generate(common + ["--max-seq-len", "1024"], capsys)  # the folder's model: 512 positions
    assert rc == 0 and "warning: --max-seq-len 1024 is beyond the 512 tokens" in err
    rc, out, err = _generate(common, capsys)  # the default: 4,096, or the trained context when shorter
    assert rc == 0 and "warning" not in err and "capacity 512" in out


# ============================================================================ every CLI parser: one error line, exit 2
def _is_float(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _cpu_device(text):
    try:
        return torch.device(text).type in ("cpu", "cuda") and (
            torch.device(text).type == "cpu" or torch.cuda.is_available()
        )
    except (RuntimeError, ValueError):
        return False


def _bad_cases():
    from hypothesis import strategies as st

    nan_inf = st.sampled_from(["nan", "inf", "-inf", "1e999"])
    not_a_number = st.text(max_size=8).filter(lambda s: not _is_float(s))
    below = lambda low: st.integers(max_value=low - 1).map(str)  # noqa: E731
    floats = lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw).map(repr)  # noqa: E731
    bad_float = lambda **kw: st.one_of(floats(**kw), nan_inf, not_a_number)  # noqa: E731
    bad_list = lambda bad, good: st.lists(st.one_of(bad, good), max_size=3).flatmap(  # noqa: E731
        lambda items: bad.map(lambda b: ",".join(items + [b]))
    )
    gen, ev, cap = "dms_flex.generate", "dms_flex.eval", "dms_flex.capacity"
    return [
        (gen, "--temperature", bad_float(max_value=-1e-9)),
        (gen, "--top-p", st.one_of(bad_float(max_value=0.0), floats(min_value=1.0000001))),
        (gen, "--top-k", st.one_of(below(1), not_a_number)),
        (gen, "--cache-capacity", below(1)),
        (gen, "--max-new-tokens", below(1)),
        (gen, "--max-seq-len", below(2)),
        (gen, "--window", below(0)),
        (gen, "--seed", st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1)).map(str)),
        (gen, "--device", st.text(max_size=10).filter(lambda s: not _cpu_device(s))),
        (gen, "--prompt", st.one_of(st.text(" \t\n", max_size=3), st.text(max_size=5).map(lambda s: s + "\udce9"))),
        (gen, "--chat", st.one_of(st.text(" \t\n", max_size=3), st.text(max_size=5).map(lambda s: "\udcff" + s))),
        (gen, "--dtype", st.text(max_size=8).filter(lambda s: s not in ("float32", "bfloat16", "float16"))),
        (gen, "--heatmap", st.text("abc", min_size=1, max_size=6).map(lambda s: f"/nonexistent-{s}/x.png")),
        (
            ev,
            "--cr",
            bad_list(
                st.one_of(floats(max_value=0.999), nan_inf, not_a_number.filter(lambda s: "," not in s and s.strip())),
                st.sampled_from(["2", "4"]),
            ),
        ),
        (
            ev,
            "--lengths",
            bad_list(st.one_of(below(1), st.sampled_from(["1.5", "abc", "nan", "inf"])), st.sampled_from(["256"])),
        ),
        (
            ev,
            "--depths",
            bad_list(st.one_of(floats(min_value=1.0001), floats(max_value=-0.0001), nan_inf), st.sampled_from(["0.5"])),
        ),
        (ev, "--batch-size", below(1)),
        (ev, "--ppl-len", below(2)),
        (ev, "--temperature", bad_float(max_value=-1e-9)),
        (ev, "--top-p", st.one_of(bad_float(max_value=0.0), floats(min_value=1.0000001))),
        (ev, "--heavy-fraction", st.one_of(floats(min_value=1.0001), floats(max_value=-0.0001), nan_inf)),
        (
            ev,
            "--dms-alpha-offset",
            st.one_of(
                nan_inf.map(lambda v: f"2={v}"),
                not_a_number.map(lambda v: f"2={v}"),
                st.sampled_from(["nan=1", "0.5=1", "abc"]),
            ),
        ),
        (cap, "--cr", bad_float(max_value=0.999)),
        (cap, "--gpu-mem", bad_float(max_value=0.0)),
        (cap, "--headroom", bad_float(max_value=0.999)),
        (cap, "--context", st.one_of(below(1), st.sampled_from(["1.5", "nan", "1" + "0" * 400]))),
    ]


def _parse(module, argv):
    import importlib

    mod = importlib.import_module(module)
    return mod.parse_args(argv)


def test_cli_parsers_turn_random_bad_values_into_one_error_line():
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    cases = _bad_cases()

    @settings(max_examples=25 * 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=st.sampled_from(cases), data=st.data())
    def check(case, data):
        module, flag, values = case
        value = data.draw(values, label=flag)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            _parse(module, [f"{flag}={value}"])
        text = err.getvalue()
        assert e.value.code == 2, (flag, value, text)
        assert "Traceback" not in text
        lines = [line for line in text.splitlines() if "error:" in line]
        assert len(lines) == 1 and text.rstrip("\n").endswith(lines[0]), text

    check()


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("dms_flex.eval", ["--cr", "abc"], "--cr: 'abc' is not a number"),
        ("dms_flex.eval", ["--lengths", "256,abc"], "--lengths: 'abc' is not a number"),
        ("dms_flex.eval", ["--cr", "nan"], "--cr: 'nan' is out of range"),  # refused after vanilla and DMS had run
        ("dms_flex.eval", ["--out", str(README)], "is a file"),  # a FileExistsError after loading the model
        ("dms_flex.capacity", ["--cr", "inf"], "argument --cr: 'inf' is out of range"),  # ZeroDivisionError
        ("dms_flex.capacity", ["--cr", "nan"], "argument --cr: 'nan' is out of range"),  # "cannot convert float NaN"
        ("dms_flex.capacity", ["--gpu-mem", "nan"], "argument --gpu-mem: 'nan' is out of range"),
        ("dms_flex.capacity", ["--headroom", "nan"], "argument --headroom: 'nan' is out of range"),
    ],
)
def test_eval_and_capacity_numbers_are_checked_when_parsed(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_capacity_plan_refuses_numbers_that_are_not_finite():
    from dms_flex import capacity

    for kw in (dict(cr=float("inf")), dict(cr=float("nan")), dict(gpu_gib=float("nan")), dict(headroom=float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            capacity.plan("llama3_8b", **{"context": 4096, "gpu_gib": 80.0, **kw})


# ============================================================================ damaged files: one line naming the file
def _copy_with(src, dst, config=None, weights=None):
    import json
    import shutil

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if weights is not None:
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(
            data[: len(data) // 2] if weights == "truncated" else bytes(range(256)) * 8
        )
    return dst


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_weights_are_one_line_everywhere(damage, tiny_hf_folder, tmp_path, capsys):
    """generate, eval, hf.from_pretrained and export-adapter gave a raw SafetensorError."""
    from dms_flex import eval as ev
    from dms_flex import hf
    from dms_flex.checkpoints import __main__ as cli
    from dms_flex.config import DMSConfig

    folder = _copy_with(
        tiny_hf_folder, tmp_path / "broken", config=DMSConfig(decision="adapter").to_hf(), weights=damage
    )
    expected = f"{folder / 'model.safetensors'} is not a readable safetensors file"
    rc, out, err = _generate(["--checkpoint", str(folder), "--prompt", "x"], capsys)
    assert rc == 2 and expected in err and "Traceback" not in err
    assert ev.main(["--model", str(folder), "--out", str(tmp_path / "eval"), "--metrics", "ppl"]) == 2
    assert expected in capsys.readouterr().err
    assert cli.main(["export-adapter", str(folder), str(tmp_path / "adapter")]) == 2
    assert expected in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(expected)):
        hf.from_pretrained(folder)


@pytest.mark.parametrize(
    "config, expected",
    [
        ("bytes", r"config.json is not UTF-8 text"),
        ({"dms_alpha_scale": "abc"}, r"config.json: dms_alpha_scale='abc' is invalid: it must be a number"),
        ({"dms_window_size": "abc"}, r"config.json: dms_window_size='abc' is invalid \(DMSConfig.window="),
    ],
)
def test_config_json_errors_name_the_file_and_the_key(config, expected, tiny_hf_folder, tmp_path, capsys):
    from dms_flex import checkpoints, hf
    from dms_flex.config import DMSConfig

    folder = _copy_with(tiny_hf_folder, tmp_path / "bad", config=DMSConfig().to_hf())
    if config == "bytes":
        (folder / "config.json").write_bytes(b'{"dms_window_size": "\xff\xfe"}')
    else:
        _copy_with(folder, tmp_path / "bad2", config=config)
        folder = tmp_path / "bad2"
    expected = re.escape(str(folder)) + ".*" + expected
    rc, out, err = _generate(["--checkpoint", str(folder), "--prompt", "x"], capsys)
    assert rc == 2 and re.search(expected, err) and "Traceback" not in err
    with pytest.raises(ValueError, match=expected):
        checkpoints.load_dms_model(folder)
    with pytest.raises(ValueError, match=expected):
        hf.from_pretrained(folder)


# ============================================================================ files others can read
def test_saved_weights_are_readable_like_the_rest_of_the_folder(tmp_path):
    """safetensors writes 0600; the folders around were made readable for others."""
    import os
    import stat

    from dms_flex import checkpoints, hf
    from dms_flex.config import DMSConfig

    from .test_hf import make

    old = os.umask(0o022)
    try:
        m = tiny_model(decision="adapter")
        hf_cfg = {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "vocab_size": 64,
            "intermediate_size": 64,
            "max_position_embeddings": 96,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            **m.dms_config.to_hf(),
        }
        folder = checkpoints.save_hf_checkpoint(m, hf_cfg, tmp_path / "tt", "llama")
        adapter = checkpoints.export_adapter(folder, tmp_path / "adapter")
        _, dms = make("llama", DMSConfig(window=2))
        hf.save_pretrained(dms, tmp_path / "hf")
        files = [
            folder / "model.safetensors",
            folder / "config.json",
            adapter / "dms_adapter.safetensors",
            tmp_path / "hf" / "model.safetensors",
        ]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
        for d in (folder, adapter):
            assert stat.S_IMODE(d.stat().st_mode) == 0o755
    finally:
        os.umask(old)


# ============================================================================ the retrofit recipe (items 1, 3; resume, leftovers)
def _recipe(cwd, monkeypatch, capsys, *args):
    """`tune run dms_retrofit --config tiny ARGS` in this process (seconds, not a new interpreter):
    (exit code, stdout, stderr)."""
    import dms_retrofit

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dms_retrofit", "--config", "tiny", "save_every_n_steps=2", *args])
    try:
        dms_retrofit.main()
        rc = 0
    except SystemExit as e:  # torchtune's config.parse exits with the recipe's return value (None)
        rc = e.code or 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_latest_takes_this_runs_newest_checkpoint_and_checks_its_settings(tmp_path, monkeypatch, capsys):
    """Item 1: `resume_from=latest` took another run's newer step folder (past max_steps, other lr)."""
    import os
    import stat

    d = tmp_path / "D"
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=6")  # the first run
    assert rc == 0, err
    first_step4 = _weights(d / "step_000004")
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=4", "optimizer.lr=5e-4")
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(d / "final" / "model.safetensors").st_mode) & 0o044 == 0o044  # readable by others
    second_final = _weights(d / "final")
    # what a kill while the second run saved step 4 (and replaced step 2) leaves behind
    (d / ".step_000004.tmp-k1ll3d").mkdir()
    (d / ".step_000004.tmp-k1ll3d" / "model.safetensors").write_bytes(b"half")
    (d / ".final.tmp-abcd1234").mkdir()
    (d / "step_000002" / ".recipe_state.pt.tmp-4242").write_bytes(b"partial")
    rc, out, err = _recipe(
        tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=4", "optimizer.lr=5e-4", "resume_from=latest"
    )
    assert rc == 0, err
    assert re.search(r"resumed from \S+step_000002 at step 2", out), out  # not the first run's step 4
    assert "removed what an interrupted save left" in out
    assert not [p for p in d.rglob(".*tmp-*")]
    wf = _weights(d / "final")
    assert all(torch.equal(wf[k], second_final[k]) for k in wf)  # = the run it continued
    assert all(torch.equal(a, b) for a, b in zip(_weights(d / "step_000004").values(), first_step4.values()))

    # another run's settings are named, not resumed
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=4", "resume_from=latest")
    assert rc == 2 and "belongs to a run with other settings" in err and "optimizer.lr=0.0005 there, 0.001 now" in err
    rc, out, err = _recipe(
        tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=3", f"resume_from={d / 'step_000004'}"
    )
    assert rc == 2 and "it is at step 4, past max_steps=3" in err
    rc, out, err = _recipe(
        tmp_path,
        monkeypatch,
        capsys,
        "output_dir=D",
        "max_steps=6",
        "dataset.modules=[json]",
        f"resume_from={d / 'step_000004'}",
    )
    assert rc == 2 and "dataset.modules" in err


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, monkeypatch, capsys):
    """A truncated recipe_state.pt was a raw torch.load error, and `latest` kept choosing it; damaged
    weights of a resumed checkpoint were a raw SafetensorError."""
    d = tmp_path / "D"
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=5")
    assert rc == 0, err
    final = _weights(d / "final")
    state = (d / "step_000004" / "recipe_state.pt").read_bytes()
    (d / "step_000004" / "recipe_state.pt").write_bytes(state[: len(state) // 2])
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=5", "resume_from=latest")
    assert rc == 0, err
    assert "step_000004 damaged: falling back to step_000002" in out and "at step 2" in out
    assert all(torch.equal(v, final[k]) for k, v in _weights(d / "final").items())
    (d / "step_000004" / "recipe_state.pt").write_bytes(state[:100])  # the resumed run rewrote it whole
    rc, out, err = _recipe(
        tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=5", f"resume_from={d / 'step_000004'}"
    )
    assert rc == 2 and "recipe_state.pt cannot be read" in err
    weights = d / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, out, err = _recipe(
        tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=5", f"resume_from={d / 'step_000002'}"
    )
    assert rc == 2 and "model.safetensors is not a readable safetensors file" in err


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda d: (d / "final").mkdir() or (d / "final" / "config.json").write_text("{}"), "final/"),  # was replaced
        (lambda d: (d / "kept_heatmap.png").write_bytes(b"mine"), "kept_heatmap.png"),  # was overwritten
        (lambda d: (d / "step_000004").mkdir() or (d / "step_000004" / "x").write_text("x"), "step_000004/"),
    ],
)
def test_output_dir_holding_what_the_recipe_did_not_write_is_refused_at_start(
    make, name, tmp_path, monkeypatch, capsys
):
    """Item 3: an unrelated step_000004/ was found only at save time, after training, with a traceback."""
    d = tmp_path / "D"
    d.mkdir()
    make(d)
    before = sorted((p.relative_to(d), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=4")
    assert rc == 2 and f"holds 1 entry this recipe did not write ({name})" in err and "overwrite=true" in err
    assert sorted((p.relative_to(d), p.read_bytes() if p.is_file() else None) for p in d.rglob("*")) == before


def test_output_dir_that_is_a_file_and_overwrite(tmp_path, monkeypatch, capsys):
    (tmp_path / "F").write_text("a file")
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=F", "max_steps=1")  # was FileExistsError
    assert rc == 2 and "is a file" in err
    d = tmp_path / "D"
    (d / "final").mkdir(parents=True)
    (d / "final" / "notes.txt").write_text("mine")
    (d / "README").write_text("mine")
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=1", "overwrite=true")
    assert rc == 0, err
    assert (d / "final" / "config.json").is_file() and (d / "README").read_text() == "mine"
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, "output_dir=D", "max_steps=1")  # README: not ours
    assert rc == 2 and "(README)" in err


def test_resume_checks_the_data(tmp_path, monkeypatch, capsys):
    """The same settings over a data file that changed since: not the run the checkpoint belongs to."""
    (tmp_path / "corpus.txt").write_text("some text about memory and what it keeps. " * 40)
    data = [
        "dataset._component_=torchtune.datasets.text_completion_dataset",
        "dataset.source=text",
        "dataset.data_files=corpus.txt",
        "dataset.sample_by=document",
        "~dataset.modules",
        "output_dir=D",
        "max_steps=3",
    ]
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, *data)
    assert rc == 0, err
    (tmp_path / "corpus.txt").write_text("some text about MEMORY and what it keeps. " * 40)
    rc, out, err = _recipe(tmp_path, monkeypatch, capsys, *data, "resume_from=latest")
    assert rc == 2 and "its run trained on other data" in err


def test_a_state_longer_than_the_models_rope_table_is_refused():
    """Positions past the model's max_seq_len would index past its RoPE table (a device-side assert on
    CUDA, found by benchmarks/bench_generate.py --profile-decode): the state refuses such a length at once."""
    m = tiny_model(max_seq_len=96)
    with pytest.raises(ValueError, match=r"max_seq_len=97 exceeds the model's max_seq_len=96.*load_dms_model"):
        tm.InferenceState(m, 1, max_seq_len=97)
    state = tm.InferenceState(m, 1, max_seq_len=96)  # the model's own length is fine
    logits = tm.prefill(m, torch.randint(0, 64, (1, 95)), state)
    assert logits.shape == (1, 64) and torch.isfinite(logits).all()  # the last position's logits
    tm.decode_step(m, torch.zeros(1, 1, dtype=torch.long), state)  # position 95: the table's last row
