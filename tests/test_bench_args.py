"""The benchmark scripts' own argument parsing: bad values are one clear usage error."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_decode_kernel as bk  # noqa: E402
import bench_decode_step as bs  # noqa: E402


def test_decode_step_cache_kinds():
    assert bs.parse_kind("8") == (8.0, None)
    assert bs.parse_kind("1-int8") == (1.0, torch.int8)
    for bad in ("8-fp8", "eight", "0.5"):
        with pytest.raises(ValueError, match="expected gptfast, a CR >= 1"):
            bs.parse_kind(bad)


def test_decode_step_decode_configs(tmp_path):
    """--decode-config NAME=JSON or NAME=best:SWEEP.json (the first case's best trial), keys checked."""
    import argparse
    import json

    assert bs.parse_decode_config('one={"num_splits": 1, "f16": true}') == ("one", {"num_splits": 1, "f16": 1})
    assert bs.parse_decode_config('f={"f16": "arith_fold"}') == ("f", {"f16": "arith_fold"})
    assert bs.split_kind("8-int8@f") == ("8-int8", "f") and bs.split_kind("8") == ("8", "")
    sweep = tmp_path / "sw.json"
    best = {"block_n": 128, "num_warps": 4, "num_stages": 3, "split_size": 2176, "num_splits": 2, "time_us": 55.5}
    sweep.write_text(json.dumps({"cases": [{"best": best}]}))
    assert bs.parse_decode_config(f"b=best:{sweep}") == (
        "b",
        {"block_n": 128, "num_warps": 4, "num_stages": 3, "num_splits": 2},
    )
    sweep.write_text(json.dumps({"cases": [{"best": None}]}))
    for bad, message in (
        ("noequals", "expected NAME=JSON"),
        ('x={"split": 2}', "keys among"),
        ("x=[1]", "keys among"),
        ('x={"f16": "fast"}', "f16 must be"),
        (f"x=best:{sweep}", "no successful trial"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bs.parse_decode_config(bad)


def test_decode_kernel_shapes_and_crs():
    assert bk.parse_shapes("8x32768,1x131072") == [(8, 32768), (1, 131072)]
    assert bk.parse_crs("2,4") == [2, 4]
    for bad in ("8x", "8-32768", "0x10", ""):
        with pytest.raises(Exception, match="BxCTX"):
            bk.parse_shapes(bad)
    for bad in ("two", "0,2", ""):
        with pytest.raises(Exception, match="integer CRs"):
            bk.parse_crs(bad)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench_decode_step.py", ["--device", "cpu", "--cache", "8-fp8"], "expected gptfast"),
        ("bench_decode_step.py", ["--device", "cpu", "--cache", "8@one"], "no --decode-config one=..."),
        ("bench_decode_step.py", ["--device", "cpu", "--decode-config", "one"], "expected NAME=JSON"),
        ("bench_decode_kernel.py", ["--cpu-smoke", "--shapes", "8by4"], "expected BxCTX"),
        (
            "bench_train_attention_kernel.py",
            ["--cpu-smoke", "--variants", "sdpa_causal,sdpa_bogus"],
            "unknown variant(s) ['sdpa_bogus']",
        ),
        (
            "bench_train_attention_kernel.py",
            ["--cpu-smoke", "--variants", "triton_dms_tuned"],
            "needs --sweep --sweep-apply",
        ),
    ],
)
def test_bad_values_are_usage_errors(script, args, message):
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_cpu_generate_arguments():
    """bench_cpu_generate.py: unknown modes and a prompt that cannot fit are usage errors naming the bound."""
    import bench_cpu_generate as bc

    args = bc.parse_args(["--modes", "dms,dms-hf", "--prompt-tokens", "2048", "--new-tokens", "16"])
    assert args.prompt_tokens == 2048 and args.modes == "dms,dms-hf"
    for bad, msg in (
        (["--modes", "dms,fast"], "unknown"),
        (["--prompt-tokens", "4090", "--new-tokens", "16"], r"\[1, 4080\]"),
        (["--prompt-tokens", "0"], "must be in"),
    ):
        with pytest.raises(SystemExit):
            bc.parse_args(bad)
        proc = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "bench_cpu_generate.py"), *bad],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert re.search(msg, proc.stderr), proc.stderr
