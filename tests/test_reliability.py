"""Issue 17: what broke when the project was tried as a new user would. Each test here failed on the
commit before the fixes (a2eb590) and names the item it covers."""

import re
import sys
from pathlib import Path

import pytest
import torch

from dms_flex import stats
from dms_flex import torchtune_model as tm

from .test_inference import teacher_forced, tiny_model

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
    written = len(transcript) - 1
    assert int(state.next_pos[0]) == written
    _, evicted = teacher_forced(m, full[:, :written])
    for cache, ev in zip(state.caches, evicted):
        kept = stats.kept_fraction(ev, m.dms_config.effective_window) * written
        assert torch.equal(cache.length, kept.round().long())


def test_chat_loop_of_20_turns_equals_one_teacher_forced_pass():
    from dms_flex.generation import generate_tokens

    m = tiny_model(window=3, max_seq_len=256)
    state = tm.InferenceState(m, 1)
    g = torch.Generator().manual_seed(1)
    transcript, generated_at = [], []
    for turn in range(20):
        prompt = torch.randint(0, 64, (int(turn % 3 != 2) * 3,), generator=g).tolist()  # every third turn: empty
        if turn == 0:
            prompt = [1, 2, 3]
        res = generate_tokens(m, [prompt], state, max_new_tokens=1 + turn % 4,
                              stop_tokens=[7] if turn % 5 == 4 else ())
        transcript += prompt
        generated_at += range(len(transcript), len(transcript) + len(res.tokens[0]))
        transcript += res.tokens[0]
    assert len(transcript) > 60
    _assert_transcript_matches(m, transcript, generated_at, state)


def test_a_batch_row_that_stopped_early_is_not_continued_silently():
    from dms_flex.generation import generate_tokens

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
    section = text[text.index("## Using it from Python"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)

    def small_llama3_2_1b():  # the README's model, 1.2B parameters, at a test's size (its vocabulary kept)
        from torchtune.models.llama3_2._component_builders import llama3_2

        return llama3_2(vocab_size=128_256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                        max_seq_len=4096, intermediate_dim=64)

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


@pytest.mark.parametrize("extra, message", [
    (["--chat", ""], "--chat is empty"),  # ran the default poem prompt
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),  # bytes b"caf\xe9" from the shell
    (["--prompt", "x", "--cache-capacity", "0"], "--cache-capacity must be >= 1"),  # became 4,096
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1]"),  # even when greedy
    (["--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", "x", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["--prompt", "x", "--heatmap", "/nonexistent/dir/x.png"], "the folder /nonexistent/dir does not exist"),
])
def test_generate_refuses_bad_arguments_before_loading(extra, message, tmp_path, capsys):
    rc, out, err = _generate(["--checkpoint", str(tmp_path / "never_read")] + extra, capsys)
    assert rc == 2 and message in err and "Traceback" not in err and not out


def test_generate_cache_overflow_and_a_context_beyond_training_are_one_line(tiny_hf_folder, capsys):
    common = ["--checkpoint", str(tiny_hf_folder), "--prompt", "Hello there, how are you today? " * 3,
              "--max-new-tokens", "8", "--window", "2"]
    rc, out, err = _generate(common + ["--cache-capacity", "10", "--max-seq-len", "128"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"^error: .*(ran out of slots \(capacity 10|holds 10 per batch row).*--cache-capacity 10\)$", err, re.M)
    rc, out, err = _generate(common + ["--max-seq-len", "1024"], capsys)  # the folder's model: 512 positions
    assert rc == 0 and "warning: --max-seq-len 1024 is beyond the 512 tokens" in err
    rc, out, err = _generate(common, capsys)  # the default: 4,096, or the trained context when shorter
    assert rc == 0 and "warning" not in err and "capacity 512" in out
