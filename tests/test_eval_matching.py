"""python -m dms_flex.eval at equal memory per metric (issue 16 items 4-6): the baselines at DMS's achieved CR on
each metric's own inputs, the KV bytes per cell and their 5% mark, --match-dms across processes, the 95%
intervals, and the user's own text (--text-file)."""

import json
import math
import statistics

import pytest
import torch

from dms_flex import eval as ev
from dms_flex.eval import data as eval_data
from dms_flex.eval import intervals, probes, report

from .test_eval import ENC, byte_model, decode, encode, run_args, tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quiet(args, loaded):
    return ev.run(args, loaded=loaded, log=lambda s: None)


# ----------------------------------------------------------------------------- intervals
def test_mean_and_paired_intervals_by_hand():
    scores = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    iv = intervals.mean_interval(scores)
    sd = statistics.stdev(scores)  # n - 1 in the denominator
    half = 1.959963984540054 * sd / math.sqrt(6)
    assert iv["mean"] == pytest.approx(3.5 / 6) and iv["n"] == 6
    assert iv["low"] == pytest.approx(3.5 / 6 - half) and iv["high"] == pytest.approx(3.5 / 6 + half)
    ref = [1.0, 1.0, 0.0, 1.0, 0.5, 0.0]
    diff = [a - b for a, b in zip(scores, ref)]  # 0, -1, 1, 0, 0, 0
    piv = intervals.paired_interval(scores, ref)
    assert piv["mean"] == pytest.approx(0.0)
    assert piv["half_width"] == pytest.approx(1.959963984540054 * statistics.stdev(diff) / math.sqrt(6))
    assert intervals.mean_interval([0.25])["half_width"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        intervals.mean_interval([])
    with pytest.raises(ValueError, match="same items"):
        intervals.paired_interval([1.0], [1.0, 0.0])
    assert intervals.format_interval(piv, scale=100, digits=1).startswith("0.0 [")


# ----------------------------------------------------------------------------- --text-file
def test_user_text_file_folder_and_every_bad_input(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("\ufeffFirst file.\n", encoding="utf-8")  # a byte-order mark is dropped
    assert eval_data.user_text(one).text == "First file.\n"
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    src = eval_data.user_text(folder)
    assert src.name == "user" and src.text == "ay\n\nbee\n\nsea" and "3 .txt files" in src.origin
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        eval_data.user_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt file"):
        eval_data.user_text(tmp_path / "empty")
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(byte 3.*iconv"):
        eval_data.user_text(bad)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        eval_data.user_text(blank)


def test_windows_of_a_short_text_are_disjoint_slices_of_its_tokens_and_too_short_says_what_fits():
    text = "".join(chr(ord("a") + i % 26) for i in range(130))
    src = eval_data.TextSource("user", text, "test")
    ids = encode(text)
    w = eval_data.windows_of(encode, src, 3, 40)
    # 130 tokens, 3 windows of 40: 10 spare tokens, 5 between two windows
    assert w == [ids[0:40], ids[45:85], ids[90:130]]
    assert eval_data.windows_of(encode, src, 1, 130) == [ids]
    with pytest.raises(ValueError, match=r"has 130 tokens: 4 window\(s\) of 40 tokens need 160; use --ppl-windows 3"):
        eval_data.windows_of(encode, src, 4, 40)
    with pytest.raises(ValueError, match="--ppl-windows 1 --ppl-len 130"):
        eval_data.windows_of(encode, src, 1, 200)


def test_a_haystack_text_too_short_for_the_probe_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match=r"haystack text has 11 tokens, fewer than the \d+ a probe needs"):
        probes.needle_item(encode, decode, "Short text.", 200, 0.5, 12345)


def test_cli_text_file_errors_come_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--text-file", str(tmp_path / "nope.txt")])
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    args = ev.parse_args(["--text-file", str(tmp_path / "t.txt")])
    assert args.texts == []  # the user's text alone
    assert ev.parse_args([]).texts == list(eval_data.TEXT_SOURCES)
    args = ev.parse_args(["--text-file", str(tmp_path / "t.txt"), "--texts", "code"])
    assert args.texts == ["code"]


def test_run_on_the_users_text_reads_its_windows_and_haystacks(tmp_path):
    words = " ".join(f"zebra{i % 97}." for i in range(900))  # ~7,000 byte tokens, nothing like the built-ins
    (tmp_path / "mine.txt").write_text(words, encoding="utf-8")
    args = run_args(
        tmp_path / "out",
        "--text-file",
        str(tmp_path / "mine.txt"),
        "--methods",
        "vanilla",
        "--metrics",
        "ppl,needle",
        "--ppl-windows",
        "2",
    )
    args.texts = []  # run_args asks for --texts code: the user's text alone here
    logs = []
    res = ev.run(args, loaded=tiny_loaded(), log=logs.append)
    assert list(res["data"]) == ["user"] and "mine.txt" in res["data"]["user"]
    assert res["runs"][0]["ppl"]["tokens"] == 2 * (48 - 8) and res["runs"][0]["needle"]["n"] == 1
    assert any(line.startswith("long context: haystack user") for line in logs)
    windows = eval_data.windows_of(encode, eval_data.user_text(tmp_path / "mine.txt"), 2, 48)
    assert all(decode(w).count("zebra") >= 4 for w in windows)
    # too short for the windows asked for: a clear error through the CLI's error path
    (tmp_path / "tiny.txt").write_text("a few words only", encoding="utf-8")
    with pytest.raises(ValueError, match="use --ppl-windows 1 --ppl-len 16"):
        quiet(run_args(tmp_path / "o2", "--text-file", str(tmp_path / "tiny.txt"), "--metrics", "ppl"), tiny_loaded())


# ----------------------------------------------------------------------------- equal memory per metric
def test_perplexity_bytes_teacher_forced_equal_the_cache_and_vanilla_is_every_token():
    m = byte_model(window=2)
    windows = torch.randint(1, 256, (3, 30))
    attn = m.layers[0].attn
    per_slot = 2 * attn.head_dim * 4  # float32 K and V
    van = ev.perplexity(ev.Method("vanilla", m), windows, m, prefix=4)
    assert van["kv_live_bytes"] == 3 * 29 * len(m.layers) * attn.num_kv_heads * per_slot and van["cr_slots"] == 1.0
    dms = ev.Method("dms", m, dms_config=m.dms_config.replace(alpha_offset=0.0))
    tf = ev.perplexity(dms, windows, m, prefix=4)
    cached = ev.perplexity(dms, windows, m, prefix=4, cached=True)  # bytes read off the real cache
    assert tf["cr_slots"] > 1.2 and tf["kv_live_bytes"] == pytest.approx(cached["kv_live_bytes"])
    assert tf["cr_slots"] == pytest.approx(tf["cr"])  # equal-length windows: both CR definitions agree
    # a policy at that CR holds ceil(29 / CR) slots per (window, layer, head)
    pol = ev.perplexity(ev.Method("h2o", m, cr=tf["cr_slots"]), windows, m, prefix=4)
    want = 3 * math.ceil(29 / tf["cr_slots"] - 1e-9) * len(m.layers) * attn.num_kv_heads * per_slot
    assert pol["kv_live_bytes"] == want


def test_each_baseline_metric_runs_at_the_cr_dms_reached_on_that_metrics_inputs(tmp_path):
    loaded = tiny_loaded(window=2)
    args = run_args(
        tmp_path,
        "--cr",
        "2",
        "--dms-alpha-offset",
        "2=0",
        "--methods",
        "vanilla,dms,streaming,h2o",
        "--metrics",
        "ppl,needle,vartrack",
    )
    runs = quiet(args, loaded)["runs"]
    dms = next(r for r in runs if r["method"] == "dms")
    crs = {k: dms[k]["cr_slots"] for k in ("ppl", "needle", "vartrack")}
    assert len({round(c, 3) for c in crs.values()}) > 1  # the inputs differ, so do DMS's CRs on them
    for r in runs:
        if r["method"] in ("streaming", "h2o"):
            assert r["cr_by_metric"] == pytest.approx(crs)
            for k, c in crs.items():  # the policy reaches that CR (to a slot's rounding) on those inputs
                assert r[k]["cr_slots"] == pytest.approx(c, rel=0.08), (r["method"], k)
            assert r["ppl"]["kv_live_bytes"] == pytest.approx(dms["ppl"]["kv_live_bytes"], rel=0.05)
    md = (tmp_path / "table.md").read_text()
    assert "KiB" in md and "x," in md


def synthetic(method, cr, bytes_per_seq, acc=0.5, scores=None):
    rec = {"accuracy": acc, "cr_slots": cr, "kv_live_bytes": bytes_per_seq * 4, "sequences": 4}
    if scores is not None:
        rec["scores"] = scores
    return {"method": method, "requested_cr": None if method == "vanilla" else 8.0, "reasoning": rec}


def test_table_marks_a_cell_more_than_5_percent_from_dms_bytes_and_prints_intervals(capsys):
    runs = [
        synthetic("vanilla", 1.0, 8000, 0.75, [1, 1, 0, 1]),
        synthetic("dms", 8.0, 1000, 0.75, [1, 0, 1, 1]),
        synthetic("h2o", 8.0, 1040, 0.25, [0, 0, 1, 0]),  # +4%: within
        synthetic("tova", 7.0, 1060, 0.5, [1, 0, 0, 1]),  # +6%: marked
    ]
    assert report.bytes_off(runs[2], "reasoning", runs) == pytest.approx(1.04)
    assert report.bytes_off(runs[1], "reasoning", runs) is None  # DMS is the reference
    report.print_table(runs)
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():  # the table's row of each method (its interval line comes later)
        if line.strip():
            rows.setdefault(line.split()[0], line)
    assert rows["h2o"].rstrip().endswith("1K") and rows["tova"].rstrip().endswith("1K!")
    assert "8.00x" in rows["dms"] and "!" not in rows["dms"]
    assert "reasoning (n = 4)" in out
    # h2o - vanilla per item: -1, -1, +1, -1 -> mean -50 points
    h2o_line = next(line for line in out.splitlines() if line.strip().startswith("h2o") and "[" in line)
    assert "-50.0 [" in h2o_line
    md = report.markdown_table(runs)
    assert "†" in next(line for line in md.splitlines() if line.startswith("| tova"))
    assert "†" not in next(line for line in md.splitlines() if line.startswith("| h2o"))
    assert "**0.750**" in next(line for line in md.splitlines() if line.startswith("| dms"))


def test_match_dms_reads_another_processes_dms_crs_and_refuses_other_inputs(tmp_path):
    loaded = tiny_loaded(window=2)
    common = ("--cr", "2", "--dms-alpha-offset", "2=0", "--metrics", "ppl,needle", "--lengths", "160")
    dms = quiet(run_args(tmp_path / "dms", *common, "--methods", "dms"), loaded)["runs"][0]
    path = str(tmp_path / "dms" / "results.json")
    h2o = quiet(run_args(tmp_path / "h2o", *common, "--methods", "h2o", "--match-dms", path), loaded)["runs"][0]
    assert h2o["cr_by_metric"] == pytest.approx({"ppl": dms["ppl"]["cr_slots"], "needle": dms["needle"]["cr_slots"]})
    other = run_args(tmp_path / "x", *common, "--methods", "h2o", "--match-dms", path, "--ppl-len", "40")
    with pytest.raises(ValueError, match="other ppl inputs"):
        quiet(other, loaded)
    with pytest.raises(FileNotFoundError, match="run the DMS process first"):
        quiet(run_args(tmp_path / "y", *common, "--methods", "h2o", "--match-dms", str(tmp_path / "no.json")), loaded)
    # a DMS process that did not measure one of this run's metrics (or an older file without digests)
    only_ppl = ("--cr", "2", "--dms-alpha-offset", "2=0", "--metrics", "ppl", "--lengths", "160")
    quiet(run_args(tmp_path / "dms_ppl", *only_ppl, "--methods", "dms"), loaded)
    with pytest.raises(ValueError, match="records no DMS measurement on this run's needle inputs"):
        quiet(
            run_args(
                tmp_path / "z", *common, "--methods", "h2o", "--match-dms", str(tmp_path / "dms_ppl" / "results.json")
            ),
            loaded,
        )
    # the merged table compares the two processes' bytes cell by cell
    assert ev.main(["--merge", path, str(tmp_path / "h2o" / "results.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    h2o_run = next(r for r in merged["runs"] if r["method"] == "h2o")
    assert report.bytes_off(h2o_run, "ppl", merged["runs"]) == pytest.approx(1.0, abs=0.05)


@pytest.mark.skipif(eval_data.reasoning_available() is not None, reason="needs reasoning-gym")
def test_reasoning_records_per_item_scores_interval_and_prompt_lengths(tmp_path):
    args = run_args(tmp_path, "--methods", "vanilla", "--metrics", "reasoning", "--reasoning-shots", "4")
    rec = quiet(args, tiny_loaded())["runs"][0]["reasoning"]
    assert len(rec["scores"]) == rec["n"] == 2 and rec["accuracy"] == pytest.approx(sum(rec["scores"]) / 2)
    assert rec["interval"]["mean"] == pytest.approx(rec["accuracy"])
    assert rec["prompt_tokens"]["min"] > 4 * 20  # four solved examples before each question
    assert rec["cr_slots"] == 1.0 and rec["sequences"] == 2
    assert ENC  # the byte tokenizer: no chat template, plain Q/A text
