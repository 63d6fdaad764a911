"""benchmarks/bench_generate.py and benchmarks/bench_prefill_layer.py: CPU smoke runs on tiny settings
(JSON keys and sane values), the max-batch search, and bad arguments as one-line usage errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_generate as bg  # noqa: E402
import bench_prefill_layer as bp  # noqa: E402


def run_script(script, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCHINDUCTOR_CACHE_DIR=str(REPO / ".inductor_cache"))
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def test_generate_tiny_cpu_smoke(tmp_path):
    out = tmp_path / "gen.json"
    p = run_script(
        "bench_generate.py",
        "--device",
        "cpu",
        "--tiny",
        "--threads",
        "1",
        "--batch",
        "2",
        "max",
        "--max-batch-limit",
        "2",
        "--prompt-len",
        "40",
        "--new-tokens",
        "3",
        "--check",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "e2e tok/s" in p.stdout and "check dms: torchtune == dms-hf" in p.stdout, p.stdout
    d = json.loads(out.read_text())
    for key in ("torch", "transformers", "device", "date", "git_commit", "text", "timing"):
        assert key in d["meta"], key
    assert d["meta"]["device"] == "cpu"
    assert d["check"]["dense"]["equal"] and d["check"]["dms"]["equal"], d["check"]
    rows = d["rows"]
    assert [r["system"] for r in rows] == list(bg.SYSTEMS) * 2
    n = len(bg.SYSTEMS)
    assert [r["batch_arg"] for r in rows] == [2] * n + ["max"] * n
    for r in rows:
        assert not r.get("oom") and not r.get("error"), r
        assert r["batch"] == 2 and r["prompt_len"] == 40 and r["new_tokens"] == 3
        for key in (
            "e2e_tokens_per_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "kv_live_bytes",
            "kv_allocated_bytes",
            "wall_s",
            "ttft_s",
            "warmup_s",
        ):
            assert r[key] > 0, (key, r)
        assert r["kv_allocated_bytes"] >= r["kv_live_bytes"], r
        assert r["cr"] >= 1.0 - 1e-6, r
        assert len(r["first_tokens"]) == 3
        if r["system"] in ("dms", "dms-int8", "dms-hf", "dms-hf-growable"):
            assert r["cr"] > 1.0 and r["kv_live_bytes"] < r["kv_dense_bytes"], r  # prompt 40 > window 16
        else:
            assert r["cr"] == pytest.approx(1.0), r
        if r["batch_arg"] == "max":
            assert r["max_batch_found"] == 2
    dense = {r["system"]: r for r in rows[:n]}
    # the fixed-capacity (compileable) DMSCache and the growable one decode the same tokens, keep the same bytes
    for key in ("first_tokens", "kv_live_bytes", "cr"):
        assert dense["dms-hf"][key] == dense["dms-hf-growable"][key], key
    # eviction off on the same weights and the same rule: the same live bytes as the dense caches
    assert dense["dense"]["kv_live_bytes"] == dense["hf-dynamic"]["kv_live_bytes"]
    assert dense["dms-int8"]["kv_live_bytes"] < dense["dms"]["kv_live_bytes"]


def test_prefill_layer_cpu_smoke(tmp_path):
    out = tmp_path / "layer.json"
    p = run_script(
        "bench_prefill_layer.py",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--shapes",
        "2x96",
        "--window",
        "16",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    for key in ("torch", "device", "date", "git_commit", "heads"):
        assert key in d["meta"], key
    rows = {r["variant"]: r for r in d["rows"]}
    for v in ("sdpa_causal", "dms_hard_attention", "cache_append", "cache_append_chunk2", "legacy_mask_build"):
        assert rows[v]["ms"] > 0 and rows[v]["x_sdpa"] > 0, rows[v]
    assert rows["sdpa_causal"]["x_sdpa"] == 1.0
    assert "ms" in rows["flex_causal"] or "skipped" in rows["flex_causal"]
    assert "skipped" in rows["legacy_mask_build_compiled"]  # never compiled on CPU
    assert rows["cache_append"]["max_abs_diff_vs_dms_hard_attention"] < 1e-4
    assert 0 < rows["cache_append"]["live_fraction"] < 1  # 85% marked, window 16: most tokens gone


def test_max_batch_search():
    assert bg.find_max_batch(lambda b: b <= 37, 4096) == 37
    assert bg.find_max_batch(lambda b: True, 10) == 10
    assert bg.find_max_batch(lambda b: False, 10) == 0
    found = bg.find_max_batch(lambda b: b <= 1000, 4096)  # to within 1/32
    assert 1000 - 1000 // 32 <= found <= 1000
    calls = []
    bg.find_max_batch(lambda b: calls.append(b) or b <= 5, 4096)
    assert calls[:4] == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "module, args, message",
    [
        (bg, ["--batch", "0"], "expected an integer >= 1 or 'max'"),
        (bg, ["--batch", "16", "most"], "expected an integer >= 1 or 'max'"),
        (bg, ["--systems", "dense", "vllm"], "invalid choice: 'vllm'"),
        (bg, ["--prompt-len", "-5"], "expected an integer >= 1"),
        (bg, ["--new-tokens", "0"], "expected an integer >= 1"),
        (bg, ["--dms-capacity", "2"], "expected 'full', 'auto', a fraction in (0, 1] or 'layers[:H]'"),
        (bg, ["--text-file", "/no/such/file.txt"], "no such file"),
        (bg, ["--step-options", "[1]"], "--step-options takes a JSON object"),
        (bg, ["--step-options", "{}", "--reduce-overhead"], "not with --reduce-overhead"),
        (bg, ["--step-options", "{max_autotune}"], "invalid loads value"),
        (bp, ["--shapes", "16by7000"], "expected BxT"),
        (bp, ["--shapes", "0x128"], "expected BxT"),
        (bp, ["--evict-frac", "1.5"], "expected a fraction in [0, 1]"),
        (bp, ["--window", "-1"], "expected an integer >= 0"),
        (bp, ["--variants", "sdpa_causal", "flash3"], "invalid choice: 'flash3'"),
    ],
)
def test_bad_arguments_are_usage_errors(module, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--device", "cpu", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("module", [bg, bp])
def test_cuda_without_a_gpu_is_a_usage_error(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "bench_generate.py",
            ["--device", "cpu", "--tiny", "--batch", "max", "-3"],
            "expected an integer >= 1 or 'max'",
        ),
        ("bench_prefill_layer.py", ["--device", "cpu", "--shapes", "2x"], "expected BxT"),
    ],
)
def test_usage_error_exit_code_one_line(script, args, message):
    p = run_script(script, *args, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], p.stderr


def test_generate_profile_decode_on_the_real_caches_cpu(tmp_path):
    """--profile-decode: the live-length spread equals the caches' own lengths after the timed call plus
    the profiled steps, and a table of the step's ops (CPU here; kernels on CUDA)."""
    out = tmp_path / "gen.json"
    args = ["--device", "cpu", "--tiny", "--threads", "1", "--batch", "2", "--prompt-len", "40"]
    p = run_script(
        "bench_generate.py", *args, "--new-tokens", "3", "--systems", "dms", "--profile-decode", "--out", str(out)
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    spread = row["live_slots"]
    assert 0 < spread["mean"] <= spread["p90"] <= spread["max"] <= spread["capacity"]
    assert spread["capacity"] == 40 + 3 + 16  # full capacity, with room for the profiled steps
    assert row["profile"]["ops"] > 0 and row["profile"]["top"] and "graph_step_ms_real_caches" not in row
    prof = row["profile"]
    assert sum(n for _, n, _ in prof["all"]) == prof["ops"] and prof["top"] == prof["all"][: len(prof["top"])]
    assert 0 < len(prof["sequence"]) <= 48 and set(prof["sequence"]) <= {name for name, _, _ in prof["all"]}


def test_kernel_table_counts_times_and_order():
    """benchmarks/_bench_common.kernel_table against hand-made profiler events."""
    import sys
    from types import SimpleNamespace as E

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _bench_common import kernel_table

    ev = [E(name=n, device_time=t, self_cpu_time_total=2 * t) for n, t in [("a", 5.0), ("b", 1.0), ("a", 7.0)]]
    t = kernel_table(ev, on_gpu=True, top=1, sequence=2)
    assert t["kernels"] == 3 and t["summed_ms"] == pytest.approx(0.013)
    assert t["top"] == [("a", 2, 0.012)] and t["all"] == [("a", 2, 0.012), ("b", 1, 0.001)]
    assert t["sequence"] == ["a", "b"]
    cpu = kernel_table(ev, on_gpu=False)
    assert cpu["ops"] == 3 and cpu["summed_ms"] == pytest.approx(0.026)


def test_capacity_setting_parses():
    assert bg.parse_capacity("full") == "full" and bg.parse_capacity("0.5") == 0.5
    assert bg.parse_capacity("layers") == ("layers", 1.5) and bg.parse_capacity("layers:2") == ("layers", 2.0)
    for bad in ("layers:0.5", "layers:x", "0", "1.5", "half"):
        with pytest.raises(bg.argparse.ArgumentTypeError):
            bg.parse_capacity(bad)


def test_generate_per_layer_capacities_cpu(tmp_path):
    """--dms-capacity layers:1.0: each layer sized on the first prompt (dms_flex.torchtune_model.layer_capacities;
    on dms-hf DMSCache.calibrated_capacities, the same rule); the row records the capacities, allocates their sum,
    and generates the same tokens as the full cache where nothing overflows; both paths size alike."""
    rows = {}
    for cap in ("full", "layers:1.0"):
        out = tmp_path / f"{cap}.json"
        args = ["--device", "cpu", "--tiny", "--threads", "1", "--batch", "1", "--prompt-len", "64"]
        p = run_script("bench_generate.py", *args, "--new-tokens", "4", "--systems", "dms", "dms-hf",
                       "--dms-capacity", cap, "--out", str(out))  # fmt: skip
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        rows[cap] = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    for system in ("dms", "dms-hf"):
        full, layers = rows["full"][system], rows["layers:1.0"][system]
        caps = layers["capacity"] if isinstance(layers["capacity"], list) else [layers["capacity"]] * 2
        assert all(layers["max_live_slots"] <= 68 and 1 <= c <= 68 for c in caps) and "error" not in layers
        assert layers["kv_allocated_bytes"] == full["kv_allocated_bytes"] * sum(c + 1 for c in caps) // (2 * 69)
        assert layers["first_tokens"] == full["first_tokens"] and layers["kv_live_bytes"] == full["kv_live_bytes"]
    assert rows["layers:1.0"]["dms"]["capacity"] == rows["layers:1.0"]["dms-hf"]["capacity"]
