"""Triton-interpreter test workers: kernel cases run in a child process with TRITON_INTERPRET=1 (the
interpreter must be chosen before triton is first imported, and the parent test process runs without it)."""

import json
import os
import subprocess
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@RESULTS@@"


def run_worker(cases, run_case) -> None:
    """In the child: run every (case id, params) and print the results as one marked JSON line."""
    results = {}
    for cid, p in cases:
        try:
            results[cid] = run_case(p)
        except Exception:
            results[cid] = {"error": traceback.format_exc()}
    print(MARK + json.dumps(results))


def start_worker(test_file: str, threads: str = "1") -> subprocess.Popen:
    """Start `python test_file --interp-worker` under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", threads)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(test_file), "--interp-worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def results_of(rc: int, out: str, err: str) -> dict:
    for line in out.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"interpreter worker failed (rc={rc}):\n{out[-4000:]}\n{err[-4000:]}")
