"""python -m dms_flex.eval pieces on tiny random models: perplexity and KL, probes, equal memory,
the JSON/plot outputs, and the lm-eval adapter."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from dms_flex import baselines as bl
from dms_flex import eval as ev
from dms_flex import eval_data
from dms_flex import lm_eval_adapter as lea
from dms_flex import torchtune_model as tm
from dms_flex.config import DMSConfig
from dms_flex.pretrained import DMSModel


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
    from torchtune.models.llama3._component_builders import llama3

    torch.manual_seed(seed)
    m = llama3(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=max_seq_len,
               intermediate_dim=64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    tm.add_dms(m, DMSConfig(window=window, decision=decision, alpha_scale=5.0, alpha_offset=offset))
    if decision == "adapter":
        with torch.no_grad():
            for layer in m.layers:
                layer.attn.dms_adapter.linear.weight.normal_(0, 0.5)
    return m


ENC = ByteTokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is fastest, and much faster on a busy two-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
HAY = ("It was a truth universally acknowledged. The morning was bright; the road was long. " * 40
       + "She said nothing at all! Nobody knew why? ") * 3


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
        assert res["n"] == 8 and 0 <= res["accuracy"] <= 1 and set(res["by_length_depth"]) == {
            "len160_depth0.2", "len160_depth0.8", "len200_depth0.2", "len200_depth0.8"}


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
            live[name] = ev._state_numbers([state])["kv_live_bytes"]
            seen = state.next_pos
            slots = sum(math.ceil(int(s) / cr - 1e-9) for s in seen)
            c0 = state.caches[0]
            assert live[name] == slots * len(state.caches) * c0.k.shape[1] * c0.bytes_per_slot()
        assert len(set(live.values())) == 1, live


# ----------------------------------------------------------------------------- the whole run
def run_args(tmp_path, *extra):
    return ev.parse_args(["--texts", "code", "--ppl-len", "48", "--ppl-prefix", "8", "--lengths", "256", "--hops", "1",
                          "--depths", "0.5", "--reasoning-n", "2", "--reasoning-max-new", "3",
                          "--reasoning-shots", "1", "--out", str(tmp_path), "--device", "cpu", *extra])


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
    for r in data["runs"][2:]:  # the baselines run at the CR DMS achieved for the request
        assert r["cr"] == dms["cr"] and abs(r["ppl"]["cr"] - dms["cr"]) < 0.2
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
    with pytest.raises(SystemExit):
        ev.parse_args(["--dms-checkpoint", "dir-without-cr"])
    args = ev.parse_args(["--cr", "2", "--dms-alpha-offset", "8=1.5", "--parallel-samples", "4",
                          "--dms-window", "64", "--dms-window", "16=8"])
    assert args.cr == [2.0, 4.0, 8.0, 16.0] and args.dms_alpha_offset == {8.0: 1.5}
    assert args.dms_window == 64 and args.dms_window_at == {16.0: 8}
    with pytest.raises(SystemExit):
        ev.parse_args(["--dms-window", "64", "--dms-window", "32"])


def test_dms_runs_per_requested_cr_and_baselines_follow_their_achieved_cr(tmp_path):
    m = byte_model(window=2)
    loaded = DMSModel(model=m, tokenizer=ENC, dms=m.dms_config, hf_config={}, family="tiny", dms_trained=True)
    args = run_args(tmp_path, "--cr", "2,3", "--dms-calibrate", "--dms-window", "3=1", "--methods", "dms,h2o",
                    "--metrics", "ppl")
    runs = ev.run(args, loaded=loaded, log=lambda s: None)["runs"]
    dms = {r["requested_cr"]: r for r in runs if r["method"] == "dms"}
    assert set(dms) == {2.0, 3.0} and "calibrated" in dms[2.0]["setting"]
    assert abs(dms[2.0]["cr"] - 2.0) < 0.3 and abs(dms[3.0]["cr"] - 3.0) < 0.45
    for r in runs:
        if r["method"] == "h2o":
            assert r["cr"] == dms[r["requested_cr"]]["cr"]


# ----------------------------------------------------------------------------- lm-eval adapter
def Req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.parametrize("method,cr", [("vanilla", None), ("dms", None), ("h2o", 2.0), ("streaming", 1.0)])
def test_lm_eval_adapter_loglikelihood_matches_a_hand_computation(method, cr):
    m = byte_model(window=3)
    lm = lea.DMSFlexLM(model=m, tokenizer=ENC, method=method, cr=cr, max_length=64)
    ctx, cont = "The road was", " long"
    (lp, greedy), = lm.loglikelihood([Req(ctx, cont)])
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
        assert s == 0 or c == toks[s - len(c): s]
        s += len(p)
    assert len(pairs[-1][0]) + len(pairs[-1][1]) - 1 == 8  # the last window gets a full context
    text = "abcdefghij"
    roll, = lm.loglikelihood_rolling([Req(text)])
    assert abs(roll - sum(lm.score(c, p)[0] for c, p in lm.rolling_windows(encode(text)))) < 1e-9
    big = lea.DMSFlexLM(model=m, tokenizer=ENC, method="vanilla", max_length=64)
    whole, = big.loglikelihood_rolling([Req(text)])
    assert abs(whole - big.loglikelihood([Req("", text)])[0][0]) < 1e-4  # empty context: the prefix token
    assert lm._split("Q: a ", "b") == (encode("Q: a"), encode(" b"))
    gen, = big.generate_until([Req("hello", {"until": ["\n"], "max_gen_toks": 6})])
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
    reqs = [Instance("loglikelihood", {}, ("The road", " was"), 0),
            Instance("loglikelihood", {}, ("The road", " is"), 1)]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(isinstance(lp, float) and lp < 0 for lp, _ in out)
    assert lm.generate_until([Instance("generate_until", {}, ("ab", {"until": ["x"], "max_gen_toks": 3}), 0)])
    del lm_eval


@pytest.mark.skipif(not __import__("os").environ.get("DMS_FLEX_LM_EVAL_E2E"),
                    reason="set DMS_FLEX_LM_EVAL_E2E=1: lm-eval's task index takes ~30 s to build")
def test_lm_eval_simple_evaluate_on_a_local_file_task(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text('{"ctx": "The road was", "choices": [" long", " blue"], "gold": 0}\n'
                    '{"ctx": "It was a truth", "choices": [" universally", " rarely"], "gold": 0}\n')
    (tmp_path / "task.yaml").write_text(
        "task: dms_flex_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{ctx}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    lm = lea.make_lm(model=byte_model(), tokenizer=ENC, method="h2o", cr=2.0, max_length=64)
    res = lm_eval.simple_evaluate(model=lm, tasks=["dms_flex_local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    assert 0 <= res["results"]["dms_flex_local_mc"]["acc,none"] <= 1


def test_dms_checkpoint_per_requested_cr_is_loaded_for_its_run(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dms_flex import pretrained

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    base_dir, ckpt = tmp_path / "base", tmp_path / "retrofit"
    hf.save_pretrained(base_dir)
    hf.save_pretrained(ckpt)
    conf = json.loads((ckpt / "config.json").read_text())
    conf.update(dms_alpha_scale=5.0, dms_initial_alpha_offset=0.0, dms_window_size=2, dms_cr=2.0)
    (ckpt / "config.json").write_text(json.dumps(conf))
    base = pretrained.load_dms_model(base_dir)
    base.tokenizer = ENC
    args = run_args(tmp_path / "out", "--cr", "2", "--dms-checkpoint", f"2={ckpt}", "--methods", "vanilla,dms,tova",
                    "--metrics", "ppl")
    runs = ev.run(args, loaded=base, log=lambda s: None)["runs"]
    dms = next(r for r in runs if r["method"] == "dms")
    assert dms["setting"] == f"checkpoint {ckpt}" and dms["cr"] > 1.2  # the retrofit's settings evict
    assert next(r for r in runs if r["method"] == "tova")["cr"] == dms["cr"]


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
