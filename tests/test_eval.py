"""python -m dms_flex.eval pieces on tiny random models: perplexity and KL, probes, equal memory,
the JSON/plot outputs, and the lm-eval adapter."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from dms_flex import eval as ev
from dms_flex import torchtune_model as tm
from dms_flex.eval import baselines as bl
from dms_flex.eval import data as eval_data
from dms_flex.eval import lm_eval as lea
from dms_flex.eval import metrics as ev_metrics
from dms_flex.checkpoints import DMSModel

from .helpers import save_tiny_llama, tiny_model


class ByteTokenizer:
    """Just enough of a transformers tokenizer: bytes are tokens, 0 is end of text."""

    eos_token_id = 0
    bos_token_id = None
    chat_template = None
    name_or_path = "bytes"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b if b else 1 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")


def byte_model(window=4, decision="adapter", offset=0.0, seed=0, max_seq_len=512):
    """tests/helpers.py's tiny model over the 256 byte tokens."""
    return tiny_model(
        seed=seed, decision=decision, window=window, offset=offset, max_seq_len=max_seq_len, vocab_size=256
    )


ENC = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def encode(text):
    return ENC(text)["input_ids"]


def decode(ids):
    return ENC.decode(ids)


# ----------------------------------------------------------------------------- perplexity and KL
def test_perplexity_is_exp_of_the_mean_nll_by_hand():
    m = byte_model()
    windows = torch.randint(1, 256, (3, 24))
    prefix = 5
    res = ev.perplexity(ev.Method("vanilla", m), windows, m, prefix=prefix, batch_size=2)
    with torch.no_grad():
        logits = tm.logits_of(m, tm.forward_train(m, windows, eviction=False, training=False).hidden)
    nll = []
    for b in range(3):
        for t in range(prefix, 24):
            nll.append(-float(torch.log_softmax(logits[b, t - 1].double(), -1)[windows[b, t]]))
    assert res["tokens"] == len(nll) == 3 * 19
    assert abs(res["nll"] - sum(nll) / len(nll)) < 1e-5
    assert abs(res["ppl"] - math.exp(sum(nll) / len(nll))) < 1e-3
    assert abs(res["kl"]) < 1e-6 and res["cr"] == 1.0


def test_kl_is_zero_for_vanilla_and_for_dms_without_eviction_and_positive_with_it():
    windows = torch.randint(1, 256, (2, 32))
    m = byte_model(window=64)  # the window covers every window: nothing can leave it
    dms = ev.Method("dms", m, dms_config=m.dms_config)
    res = ev.perplexity(dms, windows, m, prefix=4)
    assert abs(res["kl"]) < 1e-6 and abs(res["cr"] - 1.0) < 1e-9
    off = ev.Method("dms", m, dms_config=m.dms_config.replace(window=2, alpha_offset=1e6))  # never marks
    assert abs(ev.perplexity(off, windows, m, prefix=4)["kl"]) < 1e-6
    on = ev.Method("dms", m, dms_config=m.dms_config.replace(window=2, alpha_offset=0.0))
    res_on = ev.perplexity(on, windows, m, prefix=4)
    assert res_on["kl"] > 1e-4 and res_on["cr"] > 1.2
    # the cached path (prefill of the prefix, then decode steps) gives the same numbers
    cached = ev.perplexity(on, windows, m, prefix=4, cached=True)
    assert abs(cached["nll"] - res_on["nll"]) < 1e-4 and abs(cached["kl"] - res_on["kl"]) < 1e-4
    assert abs(cached["cr"] - res_on["cr"]) < 1e-6
    # a policy at CR 1 keeps everything: the dense model
    pol = ev.perplexity(ev.Method("h2o", m, cr=1.0), windows, m, prefix=4)
    assert abs(pol["kl"]) < 1e-5 and pol["cr"] == 1.0


def test_calibration_reaches_the_requested_dms_cr():
    m = byte_model(window=2)
    windows = torch.randint(1, 256, (2, 48))
    meth = ev.Method("dms", m, dms_config=m.dms_config)
    ev.calibrate_alpha_offset(meth, windows, 2.0, log=lambda s: None)
    assert abs(ev.measure_dms_cr(meth, windows) - 2.0) < 0.15


# ----------------------------------------------------------------------------- probes
HAY = (
    "It was a truth universally acknowledged. The morning was bright; the road was long. " * 40
    + "She said nothing at all! Nobody knew why? "
) * 3


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9])
def test_needle_prompt_has_its_length_its_needle_near_the_depth_and_the_question_last(depth):
    item = eval_data.needle_item(encode, decode, HAY, 400, depth, 48213, offset=7)
    text = decode(item.prompt)
    assert item.length == len(item.prompt) == 400
    assert text.endswith(eval_data.NEEDLE_QUESTION)
    at = text.index("The secret number is 48213.")
    hay_len = 400 - len(eval_data.NEEDLE_QUESTION)
    assert abs(at / hay_len - depth) < 0.15
    assert text.count("48213") == 1


def test_needle_and_variable_scoring():
    ans = ["48213"]
    assert eval_data.score_needle(" 48213.", ans) == 1.0
    assert eval_data.score_needle(" 48,213 is it", ans) == 1.0
    assert eval_data.score_needle(" 4821", ans) == 0.0
    assert eval_data.score_needle(" 12 then 48213", ans) == 0.0  # the first number counts
    assert eval_data.score_needle(" none", ans) == 0.0
    item = eval_data.vartrack_item(encode, decode, HAY, 500, 0.2, 777, hops=3, seed=1)
    text = decode(item.prompt)
    names = item.answer
    assert len(names) == 4 and len(item.prompt) == 500
    assert f"VAR {names[0]} = 777." in text
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in text
    spots = [text.index(f"VAR {n} =") for n in names]
    assert spots == sorted(spots) and spots[0] / len(text) < 0.35
    assert eval_data.score_vartrack(" ".join(names), names) == 1.0
    assert eval_data.score_vartrack(f"{names[0]}, {names[2]}", names) == 0.5


def test_probe_items_grid_and_probe_accuracy_runs_every_method():
    items = eval_data.probe_items("needle", encode, decode, HAY, [160, 200], [0.2, 0.8], trials=2, seed=3)
    assert [(i.length, i.depth) for i in items] == [(L, d) for L in (160, 200) for d in (0.2, 0.8) for _ in range(2)]
    assert len({i.answer[0] for i in items}) == len(items)
    m = byte_model()
    for meth in (ev.Method("vanilla", m), ev.Method("dms", m, dms_config=m.dms_config), ev.Method("tova", m, cr=2.0)):
        res = ev.probe_accuracy(meth, items, decode, batch_size=3)
        assert (
            res["n"] == 8
            and 0 <= res["accuracy"] <= 1
            and set(res["by_length_depth"])
            == {"len160_depth0.2", "len160_depth0.8", "len200_depth0.2", "len200_depth0.8"}
        )


def test_extract_answer_and_majority_vote():
    assert eval_data.extract_answer("think <answer> 42 </answer>") == "42"
    assert eval_data.extract_answer("\nThe answer is 17.\nmore") == "17"
    assert eval_data.extract_answer("Answer: 5") == "5"
    assert ev.majority_vote(["3", " 4", "4 ", "3", "4"]) == " 4"
    assert ev.majority_vote(["", ""]) == ""


# ----------------------------------------------------------------------------- equal memory
def test_policies_at_equal_cr_hold_equal_live_bytes():
    m = byte_model()
    prompts = [list(range(1, 30)), list(range(5, 40))]
    for cr in (2.0, 3.0):
        live = {}
        for name in bl.POLICIES:
            _, state = ev.generate_rows(ev.Method(name, m, cr=cr), prompts, 7)
            live[name] = ev_metrics._state_numbers([state])["kv_live_bytes"]
            seen = state.next_pos
            slots = sum(math.ceil(int(s) / cr - 1e-9) for s in seen)
            c0 = state.caches[0]
            assert live[name] == slots * len(state.caches) * c0.k.shape[1] * c0.bytes_per_slot()
        assert len(set(live.values())) == 1, live


# ----------------------------------------------------------------------------- the whole run
def run_args(tmp_path, *extra):
    return ev.parse_args(
        [
            "--texts",
            "code",
            "--ppl-len",
            "48",
            "--ppl-prefix",
            "8",
            "--lengths",
            "256",
            "--hops",
            "1",
            "--depths",
            "0.5",
            "--reasoning-n",
            "2",
            "--reasoning-max-new",
            "3",
            "--reasoning-shots",
            "1",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_run_writes_json_table_and_plots_with_baselines_at_the_dms_cr(tmp_path, capsys):
    m = byte_model(window=2)
    loaded = DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)
    args = run_args(tmp_path, "--cr", "2", "--dms-alpha-offset", "2=0", "--parallel-samples", "2")
    results = ev.run(args, loaded=loaded, log=lambda s: None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["data"] == {"code": results["data"]["code"]}
    methods = [r["method"] for r in data["runs"]]
    assert methods == ["vanilla", "dms", "streaming", "h2o", "tova"]
    dms = data["runs"][1]
    assert dms["setting"] == "alpha_offset 0" and dms["requested_cr"] == 2.0
    assert abs(dms["cr"] - dms["ppl"]["cr"]) < 1e-6  # measured on the perplexity windows
    for r in data["runs"][2:]:  # the baselines run, metric by metric, at the CR DMS achieved on those inputs
        assert r["cr"] == pytest.approx(dms["cr"]) and abs(r["ppl"]["cr"] - dms["cr"]) < 0.2
        assert r["cr_by_metric"] == pytest.approx({k: dms[k]["cr_slots"] for k in r["cr_by_metric"]})
        assert set(r["cr_by_metric"]) >= {"ppl", "needle", "vartrack"}
    for r in data["runs"]:
        assert set(r) >= {"ppl", "needle", "vartrack"}
        assert r["ppl"]["ppl"] > 1 and r["ppl"]["tokens"] == 40
    if eval_data.reasoning_available() is None:
        assert all("reasoning" in r for r in data["runs"])
        par = {p["method"]: p for p in data["parallel"]}
        assert par["vanilla"]["samples_per_question"] == 1 and par["dms"]["samples_per_question"] == 2
    for name in ("ppl", "kl", "needle", "vartrack"):
        assert (tmp_path / f"{name}_vs_cr.png").is_file()
    assert len(data["heatmaps"]) == 4 and all(re.search(r"kept_\w+_cr[\d.]+\.png$", h) for h in data["heatmaps"])
    out = capsys.readouterr().out
    assert "method" in out and "vanilla" in out and "tova" in out
    # the plots can be redrawn from the JSON alone (e.g. where the run had no matplotlib)
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert ev.main(["--replot", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "ppl_vs_cr.png").is_file() and len(list(tmp_path.glob("kept_*.png"))) == 4


def test_cli_argument_errors():
    with pytest.raises(SystemExit):
        ev.parse_args(["--methods", "vanilla,lru"])
    with pytest.raises(SystemExit):  # one DIR for all runs at most
        ev.parse_args(["--dms-checkpoint", "dir-a", "--dms-checkpoint", "dir-b"])
    with pytest.raises(SystemExit):
        ev.parse_args(["--dms-alpha-offset", "x=1"])
    with pytest.raises(SystemExit):
        ev.parse_args(["--kv", "int4"])
    args = ev.parse_args(["--cr", "2", "--dms-checkpoint", "runs/lr=1e-4", "--dms-checkpoint", "8=runs/cr8"])
    assert args.dms_checkpoint_all == "runs/lr=1e-4" and args.dms_checkpoint == {8.0: "runs/cr8"}
    assert args.cr == [2.0, 8.0] and args.kv == "model" and args.weight_quant == "none" and args.reference is None
    args = ev.parse_args(
        [
            "--cr",
            "2",
            "--dms-alpha-offset",
            "8=1.5",
            "--parallel-samples",
            "4",
            "--dms-window",
            "64",
            "--dms-window",
            "16=8",
        ]
    )
    assert args.cr == [2.0, 4.0, 8.0, 16.0] and args.dms_alpha_offset == {8.0: 1.5}
    assert args.dms_window == 64 and args.dms_window_at == {16.0: 8}
    with pytest.raises(SystemExit):
        ev.parse_args(["--dms-window", "64", "--dms-window", "32"])


def test_dms_runs_per_requested_cr_and_baselines_follow_their_achieved_cr(tmp_path):
    m = byte_model(window=2)
    loaded = DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)
    args = run_args(
        tmp_path, "--cr", "2,3", "--dms-calibrate", "--dms-window", "3=1", "--methods", "dms,h2o", "--metrics", "ppl"
    )
    runs = ev.run(args, loaded=loaded, log=lambda s: None)["runs"]
    dms = {r["requested_cr"]: r for r in runs if r["method"] == "dms"}
    assert set(dms) == {2.0, 3.0} and "calibrated" in dms[2.0]["setting"]
    assert abs(dms[2.0]["cr"] - 2.0) < 0.3 and abs(dms[3.0]["cr"] - 3.0) < 0.45
    for r in runs:
        if r["method"] == "h2o":
            assert r["cr"] == pytest.approx(dms[r["requested_cr"]]["cr"])


# ----------------------------------------------------------------------------- lm-eval adapter
def Req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.parametrize("method,cr", [("vanilla", None), ("dms", None), ("h2o", 2.0), ("streaming", 1.0)])
def test_lm_eval_adapter_loglikelihood_matches_a_hand_computation(method, cr):
    m = byte_model(window=3)
    lm = lea.DMSFlexLM(model=m, tokenizer=ENC, method=method, cr=cr, max_length=64)
    ctx, cont = "The road was", " long"
    ((lp, greedy),) = lm.loglikelihood([Req(ctx, cont)])
    ids = encode(ctx + cont)
    n = len(encode(ctx))
    if method in ("vanilla", "streaming"):  # streaming at CR 1 keeps everything: the dense model
        with torch.no_grad():
            logits = tm.logits_of(m, tm.forward_train(m, torch.tensor([ids]), eviction=False, training=False).hidden)[0]
    elif method == "dms":
        with torch.no_grad():
            logits = tm.logits_of(m, tm.forward_train(m, torch.tensor([ids]), training=False).hidden)[0]
    else:  # a policy: prefill the context, then decode the continuation through its cache
        state = bl.PolicyState(m, 1, bl.EvictionPolicy("h2o", 2.0), max_seq_len=64)
        rows = [bl.prefill_with_policy(m, torch.tensor([ids[:n]]), state)[0]]
        for t in range(n, len(ids) - 1):
            rows.append(bl.decode_step_with_policy(m, torch.tensor([[ids[t]]]), state)[0])
        logits = torch.cat([torch.zeros(n - 1, 256), torch.stack(rows), torch.zeros(1, 256)])
    lps = torch.log_softmax(logits.double(), -1)
    want = sum(float(lps[t - 1, ids[t]]) for t in range(n, len(ids)))
    assert abs(lp - want) < 1e-3
    assert greedy == all(int(lps[t - 1].argmax()) == ids[t] for t in range(n, len(ids)))


def test_lm_eval_adapter_rolling_windows_generation_and_context_split():
    m = byte_model(window=3)
    lm = lea.DMSFlexLM(model=m, tokenizer=ENC, method="vanilla", max_length=8)
    toks = list(range(10, 30))
    pairs = lm.rolling_windows(toks)
    assert [t for _, p in pairs for t in p] == toks  # every token predicted once
    assert all(len(c) + len(p) - 1 <= 8 for c, p in pairs)
    assert pairs[0][0] == [lm.prefix_token_id]
    s = 0
    for c, p in pairs:  # the context is the tokens right before the predicted ones
        assert s == 0 or c == toks[s - len(c) : s]
        s += len(p)
    assert len(pairs[-1][0]) + len(pairs[-1][1]) - 1 == 8  # the last window gets a full context
    text = "abcdefghij"
    (roll,) = lm.loglikelihood_rolling([Req(text)])
    assert abs(roll - sum(lm.score(c, p)[0] for c, p in lm.rolling_windows(encode(text)))) < 1e-9
    big = lea.DMSFlexLM(model=m, tokenizer=ENC, method="vanilla", max_length=64)
    (whole,) = big.loglikelihood_rolling([Req(text)])
    assert abs(whole - big.loglikelihood([Req("", text)])[0][0]) < 1e-4  # empty context: the prefix token
    assert lm._split("Q: a ", "b") == (encode("Q: a"), encode(" b"))
    (gen,) = big.generate_until([Req("hello", {"until": ["\n"], "max_gen_toks": 6})])
    full = decode(ev.generate_rows(big.method, [encode("hello")], 6, stop_tokens=[0])[0][0])
    assert gen == full.split("\n")[0]


def test_lm_eval_adapter_registers_with_lm_eval():
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    cls = lea.register()
    assert get_model("dms_flex") is cls and issubclass(cls, LM)
    lm = cls(model=byte_model(), tokenizer=ENC, method="tova", cr=2.0, max_length=64)
    reqs = [
        Instance("loglikelihood", {}, ("The road", " was"), 0),
        Instance("loglikelihood", {}, ("The road", " is"), 1),
    ]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(isinstance(lp, float) and lp < 0 for lp, _ in out)
    assert lm.generate_until([Instance("generate_until", {}, ("ab", {"until": ["x"], "max_gen_toks": 3}), 0)])
    # the harness's own settings join --model_args; a key in both (lm-eval 0.4.13 passes device twice) is taken
    # from --model_args
    kw = dict(model=byte_model(), tokenizer=ENC, method="h2o", cr="2", device="cpu")
    made = cls.create_from_arg_obj(kw, {"device": "cuda:7", "batch_size": 4, "max_batch_size": None})
    assert made.batch_size == 4 and made.method.cr == 2.0
    made = cls.create_from_arg_string("method=vanilla,max_length=32", {"model": byte_model(), "tokenizer": ENC})
    assert made.method.name == "vanilla" and made.max_length == 32
    del lm_eval


def test_lm_eval_simple_evaluate_on_a_local_file_task(tmp_path, monkeypatch):
    """lm-eval's own evaluator, end to end, on a local multiple-choice task (skipped without lm-eval):
    its accuracy is the share of items whose gold choice has the highest log-likelihood, checked against
    the adapter's scores computed directly."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [
        ("The road was", ["long", "blue"], 0),
        ("It was a truth", ["rarely", "universally"], 1),
        ("She said", ["nothing", "zebra"], 0),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"ctx": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in docs))
    (tmp_path / "task.yaml").write_text(
        "task: dms_flex_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f'    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{{{ctx}}}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n'
    )
    lm = lea.make_lm(model=byte_model(), tokenizer=ENC, method="h2o", cr=2.0, max_length=64)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["dms_flex_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
    )
    want = 0
    for ctx, choices, gold in docs:  # lm-eval's continuation: its target delimiter " ", then the choice
        lps = [lm.loglikelihood([Req(ctx, " " + ch)])[0][0] for ch in choices]
        want += max(range(len(choices)), key=lambda i: lps[i]) == gold
    assert res["results"]["dms_flex_local_mc"]["acc,none"] == pytest.approx(want / len(docs))


RETROFIT_KEYS = dict(dms_alpha_scale=5.0, dms_initial_alpha_offset=0.0, dms_window_size=2, dms_cr=2.0)


def hf_folder(path, seed=0, dms_keys=None, vocab=256):
    """A tiny random Llama saved in Hugging Face format (no tokenizer: tests set ENC); with dms_keys, a
    'retrofit' whose config.json carries DMS settings (borrowed decisions: no adapter weights)."""
    return save_tiny_llama(path, vocab_size=vocab, seed=seed, std=0.3, config_keys=dms_keys)


def load_base(folder):
    from dms_flex.checkpoints import pretrained

    base = pretrained.load_dms_model(folder)
    base.tokenizer = ENC
    return base


def test_dms_checkpoint_per_requested_cr_is_loaded_for_its_run(tmp_path):
    base_dir = hf_folder(tmp_path / "base")
    ckpt = hf_folder(tmp_path / "retrofit", dms_keys=RETROFIT_KEYS)
    base = load_base(base_dir)
    args = run_args(
        tmp_path / "out",
        "--cr",
        "2",
        "--dms-checkpoint",
        f"2={ckpt}",
        "--methods",
        "vanilla,dms,tova",
        "--metrics",
        "ppl",
    )
    runs = ev.run(args, loaded=base, log=lambda s: None)["runs"]
    dms = next(r for r in runs if r["method"] == "dms")
    assert dms["setting"] == f"checkpoint {ckpt}" and dms["cr"] > 1.2  # the retrofit's settings evict
    assert next(r for r in runs if r["method"] == "tova")["cr"] == pytest.approx(dms["cr"])


def test_text_sources_fall_back_to_plain_copies_and_then_to_python_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "kjv_text", lambda: None)
    monkeypatch.setattr(eval_data, "austen_text", lambda: None)
    monkeypatch.setenv("DMS_FLEX_TEXT_DIR", str(tmp_path))
    (tmp_path / "kjv.txt").write_text("In the beginning God created the heaven and the earth.\n" * 50)
    logs = []
    found = eval_data.load_texts(["kjv", "austen"], log=logs.append)
    assert list(found) == ["kjv"] and "plain-text copy" in found["kjv"].origin
    assert any("austen not found" in line for line in logs)
    (tmp_path / "kjv.txt").unlink()
    found = eval_data.load_texts(["kjv"], log=logs.append)
    assert list(found) == ["code"] and "fallback" in found["code"].origin
    assert len(eval_data.text_windows(encode, found["code"].text, 3, 100)) == 3


# ----------------------------------------------------------------------------- quantization and the reference
def quiet_run(tmp_path, loaded, *extra):
    return ev.run(run_args(tmp_path, "--metrics", "ppl", *extra), loaded=loaded, log=lambda s: None)


def tiny_loaded(**kw):
    m = byte_model(**kw)
    return DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)


@pytest.mark.parametrize("name", ["vanilla", "dms"])
def test_int8_teacher_forced_perplexity_equals_the_int8_cached_path(name):
    m = byte_model(window=2)
    windows = torch.randint(1, 256, (2, 40))
    cfg = m.dms_config.replace(alpha_offset=0.0) if name == "dms" else None
    int8 = ev.Method(name, m, dms_config=cfg, kv_int8=True)
    assert int8.new_state(1, 8).caches[0].k.dtype == torch.int8  # the cached path really stores int8
    teacher = ev.perplexity(int8, windows, m, prefix=6)
    cached = ev.perplexity(int8, windows, m, prefix=6, cached=True)
    assert teacher["path"] == "teacher-forced" and cached["path"].startswith("cached")
    # K/V computed token by token vs over the whole window differ by float rounding, which can move one
    # value across an int8 rounding step: equal up to that
    assert abs(cached["nll"] - teacher["nll"]) < 2e-4 and abs(cached["kl"] - teacher["kl"]) < 2e-4
    assert abs(cached["cr"] - teacher["cr"]) < 1e-6
    # and int8 is not a no-op: the same method in the model dtype gives another KL
    full = ev.perplexity(ev.Method(name, m, dms_config=cfg), windows, m, prefix=6)
    assert teacher["kl"] - full["kl"] > 1e-6
    if name == "dms":
        assert teacher["cr"] > 1.2
    # a policy has no int8 storage: the flag leaves it in the model dtype (no faked int8)
    pol = ev.Method("h2o", m, cr=2.0, kv_int8=True)
    assert not pol.int8_kv and pol.new_state(1, 8).caches[0].k.dtype == torch.float32


def test_kv_int8_adds_a_small_kl_against_the_full_precision_vanilla_and_is_reported(tmp_path, capsys):
    base = ["--methods", "vanilla,dms,h2o", "--cr", "2", "--dms-alpha-offset", "2=0"]
    fp = {r["method"]: r for r in quiet_run(tmp_path / "fp", tiny_loaded(window=2), *base)["runs"]}
    res = quiet_run(tmp_path / "q", tiny_loaded(window=2), *base, "--kv", "int8")
    q = {r["method"]: r for r in res["runs"]}
    assert abs(fp["vanilla"]["ppl"]["kl"]) < 1e-6
    assert 1e-6 < q["vanilla"]["ppl"]["kl"] < 1e-2  # the reference is the full-precision cache
    # DMS: its eviction error dominates; int8 moves its KL a little (either way: errors need not add up)
    assert 1e-6 < abs(q["dms"]["ppl"]["kl"] - fp["dms"]["ppl"]["kl"]) < 1e-2
    assert q["dms"]["cr"] > 1.5
    assert abs(q["vanilla"]["ppl"]["ppl"] / fp["vanilla"]["ppl"]["ppl"] - 1) < 0.02
    # the baseline is not quantized (PolicyState has no int8 KV): same numbers, and said so
    assert q["h2o"]["ppl"]["kl"] == fp["h2o"]["ppl"]["kl"] and "PolicyState" in q["h2o"]["kv"]
    assert (q["vanilla"]["kv"], q["dms"]["kv"], fp["dms"]["kv"]) == ("int8", "int8", "float32")
    data = json.loads((tmp_path / "q" / "results.json").read_text())
    qi = data["quantization"]
    assert qi["kv"] == "int8" and qi["kv_by_method"] == {"vanilla": "int8", "dms": "int8", "h2o": "float32"}
    assert "PolicyState has no int8" in qi["note"] and qi["weights"] == "none"
    assert json.loads((tmp_path / "fp" / "results.json").read_text())["quantization"]["kv"] == "model"
    out = capsys.readouterr().out
    assert "setting: K/V int8 (one scale per token and KV head) for vanilla, dms" in out
    assert "setting: K/V in the model dtype" in out


def test_weight_quant_evaluates_a_quantized_model_against_the_unquantized_one(tmp_path):
    from dms_flex import quant

    res = quiet_run(tmp_path / "none", tiny_loaded(), "--methods", "vanilla")
    assert abs(res["runs"][0]["ppl"]["kl"]) < 1e-6
    loaded = tiny_loaded()
    res = quiet_run(tmp_path / "w8", loaded, "--methods", "vanilla,dms", "--weight-quant", "int8", "--kv", "int8")
    van = res["runs"][0]
    assert van["weights"] == "int8" and van["ppl"]["kl"] > 1e-5
    assert quant.quantized_weight_names(loaded.model)  # the evaluated model is quantized, the reference is not
    qi = res["quantization"]
    assert qi["weights"] == "int8" and qi["quantized_weights"] == 2 * 7 + 1 and qi["reference_dtype"] == "float32"
    assert qi["reference"].endswith("(an unquantized copy)")
    # int4 (CPU: bf16): cast with a note, larger error
    loaded, logs = tiny_loaded(), []
    res = ev.run(
        run_args(tmp_path / "w4", "--metrics", "ppl", "--methods", "vanilla", "--weight-quant", "int4"),
        loaded=loaded,
        log=logs.append,
    )
    assert any("casting the model" in line and "bfloat16" in line for line in logs)
    assert res["quantization"]["model_dtype"] == "bfloat16" and res["quantization"]["reference_dtype"] == "float32"
    assert res["runs"][0]["ppl"]["kl"] > van["ppl"]["kl"]


def test_one_dms_checkpoint_calibrated_at_two_crs_is_loaded_once(tmp_path, monkeypatch):
    from dms_flex import quant
    from dms_flex.checkpoints import pretrained

    base_dir = hf_folder(tmp_path / "base")
    ckpt = hf_folder(tmp_path / "retrofit", seed=1, dms_keys=RETROFIT_KEYS)
    base = load_base(base_dir)
    loads, real = [], pretrained.load_dms_model

    def spy(folder, **kw):
        loads.append(str(folder))
        dm = real(folder, **kw)
        loads.append(dm)
        return dm

    monkeypatch.setattr(pretrained, "load_dms_model", spy)
    args = run_args(
        tmp_path / "out",
        "--cr",
        "2,3",
        "--dms-checkpoint",
        str(ckpt),
        "--dms-calibrate",
        "--methods",
        "dms,tova",
        "--metrics",
        "ppl",
        "--weight-quant",
        "int8",
    )
    runs = ev.run(args, loaded=base, log=lambda s: None)["runs"]
    assert loads[0::2] == [str(ckpt)]  # once for both CRs (the unquantized reference is a copy of --model)
    assert quant.quantized_weight_names(loads[1].model)  # the checkpoint is quantized like the model
    dms = {r["requested_cr"]: r for r in runs if r["method"] == "dms"}
    assert set(dms) == {2.0, 3.0}
    for cr, r in dms.items():
        # the base model's window (512) could never reach these CRs on 48-token windows: the checkpoint's (2) did
        assert r["setting"].startswith(f"checkpoint {ckpt}: alpha_offset") and "calibrated" in r["setting"]
        assert abs(r["cr"] - cr) < 0.15 * cr and abs(r["ppl"]["cr"] - r["cr"]) < 1e-6
    assert dms[2.0]["setting"] != dms[3.0]["setting"]
    assert [r["cr"] for r in runs if r["method"] == "tova"] == pytest.approx([dms[2.0]["cr"], dms[3.0]["cr"]])
    # without calibration: one run with the checkpoint's own settings; CR=DIR still wins for its CR
    loads.clear()
    args = run_args(
        tmp_path / "out2",
        "--cr",
        "2",
        "--dms-checkpoint",
        str(ckpt),
        "--dms-checkpoint",
        f"3={ckpt}",
        "--dms-alpha-offset",
        "2=1e6",
        "--methods",
        "dms",
        "--metrics",
        "ppl",
    )
    runs = ev.run(args, loaded=load_base(base_dir), log=lambda s: None)["runs"]
    assert [(r["requested_cr"], r["setting"]) for r in runs] == [
        (2.0, f"checkpoint {ckpt}: alpha_offset 1e+06"),
        (3.0, f"checkpoint {ckpt}"),
    ]
    assert abs(runs[0]["cr"] - 1.0) < 1e-6 and runs[1]["cr"] > 1.2  # the offset applies to the checkpoint
    assert loads[0::2] == [str(base_dir), str(ckpt)]  # base reloaded by load_base; the checkpoint once


def test_reference_folder_is_the_kl_reference(tmp_path):
    model_dir = hf_folder(tmp_path / "model")
    ref_dir = hf_folder(tmp_path / "ref", seed=1)
    res = quiet_run(tmp_path / "a", load_base(model_dir), "--methods", "vanilla", "--reference", str(ref_dir))
    kl = res["runs"][0]["ppl"]["kl"]
    assert res["quantization"]["reference"] == str(ref_dir) and kl > 0.05
    # the same number by hand: the model's perplexity against the other model's distribution
    windows = torch.tensor(eval_data.text_windows(encode, eval_data.load_texts(["code"])["code"].text, 1, 48))
    want = ev.perplexity(ev.Method("vanilla", load_base(model_dir).model), windows, load_base(ref_dir).model, prefix=8)
    assert abs(kl - want["kl"]) < 1e-5
    # --reference equal to --model: KL 0
    res = ev.run(
        run_args(
            tmp_path / "b",
            "--metrics",
            "ppl",
            "--methods",
            "vanilla",
            "--reference",
            str(model_dir),
            "--model",
            str(model_dir),
        ),
        loaded=load_base(model_dir),
        log=lambda s: None,
    )
    assert abs(res["runs"][0]["ppl"]["kl"]) < 1e-6
    with pytest.raises(ValueError, match="vocabulary"):
        quiet_run(tmp_path / "c", load_base(model_dir), "--reference", str(hf_folder(tmp_path / "v", vocab=300)))


def test_quantization_errors_are_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)  # as if torchao were missing
    assert ev.main(["--kv", "int8", "--device", "cpu", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --kv int8 needs torchao") and "Traceback" not in err
    assert ev.main(["--weight-quant", "int4", "--device", "cpu", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --weight-quant int4 needs torchao")


def test_merge_of_runs_made_side_by_side_equals_one_run(tmp_path, capsys):
    """--merge: one process per baseline (each repeating vanilla and DMS) gives the same table as one
    process running everything; duplicates are dropped, plots are drawn."""
    m = byte_model(window=2)
    loaded = DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)
    common = ("--cr", "2", "--dms-alpha-offset", "2=0", "--metrics", "ppl")
    whole = ev.run(run_args(tmp_path / "all", *common), loaded=loaded, log=lambda s: None)
    for name in ("streaming", "h2o"):
        ev.run(
            run_args(tmp_path / name, *common, "--methods", f"vanilla,dms,{name}"), loaded=loaded, log=lambda s: None
        )
    assert (
        ev.main(
            [
                "--merge",
                str(tmp_path / "streaming" / "results.json"),
                str(tmp_path / "h2o" / "results.json"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["method"] for r in merged["runs"]] == ["vanilla", "dms", "streaming", "h2o"]
    want = {r["method"]: r["ppl"]["ppl"] for r in whole["runs"]}
    for r in merged["runs"]:
        assert r["ppl"]["ppl"] == pytest.approx(want[r["method"]], rel=1e-6), r["method"]
    assert (tmp_path / "merged" / "ppl_vs_cr.png").is_file()
    assert ev.main(["--merge", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "m2")]) == 2


def test_a_run_stopped_early_leaves_its_finished_methods_and_merge_uses_them(tmp_path, monkeypatch, capsys):
    """results.json is rewritten after every method: a process killed by its time limit (here: the third
    method raises) still leaves the first two runs, marked partial, and --merge keeps them."""
    m = byte_model(window=2)
    loaded = DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)
    common = ("--cr", "2", "--dms-alpha-offset", "2=0", "--metrics", "ppl")
    # the baseline at the requested CR (a process running it alone has no DMS CR to match)
    whole = ev.run(
        run_args(tmp_path / "all", *common, "--methods", "vanilla,dms,tova", "--no-match-dms-cr"),
        loaded=loaded,
        log=lambda s: None,
    )
    real = ev.perplexity

    def stop_at_tova(method, *a, **k):
        if method.name == "tova":
            raise KeyboardInterrupt("time limit")
        return real(method, *a, **k)

    monkeypatch.setattr(ev_metrics, "perplexity", stop_at_tova)
    with pytest.raises(KeyboardInterrupt):
        ev.run(run_args(tmp_path / "cut", *common, "--methods", "vanilla,dms,tova"), loaded=loaded, log=lambda s: None)
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["partial"] is True and [r["method"] for r in cut["runs"]] == ["vanilla", "dms"]
    monkeypatch.setattr(ev_metrics, "perplexity", real)
    tova = ev.run(run_args(tmp_path / "tova", *common, "--methods", "tova"), loaded=loaded, log=lambda s: None)
    assert [r["method"] for r in tova["runs"]] == ["tova"]
    assert (
        ev.main(
            [
                "--merge",
                str(tmp_path / "cut" / "results.json"),
                str(tmp_path / "tova" / "results.json"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert "partial (the run stopped early): 2 finished run(s) kept" in capsys.readouterr().out
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    want = {r["method"]: r["ppl"]["ppl"] for r in whole["runs"]}
    assert {r["method"]: r["ppl"]["ppl"] for r in merged["runs"]} == pytest.approx(want, rel=1e-6)
    assert merged["partial_inputs"] == [str(tmp_path / "cut" / "results.json")]
    # a process that finished nothing (no file) or died mid-write (broken JSON) is skipped, not fatal
    (tmp_path / "broken.json").write_text('{"runs": [')
    assert (
        ev.main(
            [
                "--merge",
                str(tmp_path / "cut" / "results.json"),
                str(tmp_path / "never" / "results.json"),
                str(tmp_path / "broken.json"),
                "--out",
                str(tmp_path / "m3"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "never/results.json: missing" in out and "broken.json: not valid JSON" in out
    m3 = json.loads((tmp_path / "m3" / "results.json").read_text())
    assert [r["method"] for r in m3["runs"]] == ["vanilla", "dms"]
    assert m3["merged_from"] == [str(tmp_path / "cut" / "results.json")]
    assert not list((tmp_path / "cut").glob(".*tmp"))  # the atomic rewrite leaves no temporary file


def test_windows_and_probes_longer_than_the_context_are_refused_before_any_work(tmp_path):
    """A 512-token model: a 600-token perplexity window or a 512-token needle prompt (plus its answer) has
    positions past the RoPE table; the run stops with the longest values that fit, before evaluating."""
    loaded = tiny_loaded(max_seq_len=512)
    with pytest.raises(ValueError, match=r"--ppl-len 600 is longer than the model's context \(512 tokens\)"):
        ev.run(run_args(tmp_path / "a", "--metrics", "ppl", "--ppl-len", "600"), loaded=loaded, log=lambda s: None)
    with pytest.raises(ValueError, match=r"--lengths 512: .* context of 512 tokens; use lengths up to 50[0-9]"):
        ev.run(
            run_args(tmp_path / "b", "--metrics", "needle", "--lengths", "256,512"), loaded=loaded, log=lambda s: None
        )
    res = ev.run(run_args(tmp_path / "c", "--metrics", "needle", "--lengths", "500"), loaded=loaded, log=lambda s: None)
    assert res["runs"][0]["needle"]["n"] == 1


def test_parallel_table_says_when_the_samples_are_not_at_equal_memory():
    import io

    rows = [
        {
            "method": "vanilla",
            "cr": 1.0,
            "samples_per_question": 1,
            "accuracy_vote": 0.5,
            "accuracy_per_sample": 0.5,
            "kv_live_bytes_per_question": 1000.0,
        },
        {
            "method": "dms",
            "cr": 1.66,
            "samples_per_question": 4,
            "accuracy_vote": 0.4,
            "accuracy_per_sample": 0.3,
            "kv_live_bytes_per_question": 2410.0,
        },
    ]
    out = io.StringIO()
    ev.print_parallel(rows, out)
    text = out.getvalue()
    assert "(2.41x vanilla's)" in text and "dms is NOT at equal memory: it reached only CR 1.66" in text
    rows[1].update(cr=4.1, kv_live_bytes_per_question=1040.0)  # within 10%: no note
    out = io.StringIO()
    ev.print_parallel(rows, out)
    assert "(1.04x vanilla's)" in out.getvalue() and "NOT at equal memory" not in out.getvalue()
