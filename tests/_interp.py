"""Triton-interpreter test workers: kernel cases run in a child process with TRITON_INTERPRET=1 (the
interpreter must be chosen before triton is first imported, and the parent test process runs without it)."""

import atexit
import json
import os
import subprocess
import sys
import threading
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


# Workers started by `prefetch` at the start of a session, by absolute test file.
_PREFETCH: dict = {}


def prefetch(test_files) -> None:
    """Run these test files' interpreter workers one after another in a background thread from the start of
    the session (tests/conftest.py): the interpreter runs on one core, so on a two-core machine it overlaps
    the rest of the suite instead of following it. `results` then waits for the file's worker."""
    files = [os.path.abspath(f) for f in test_files if os.path.abspath(f) not in _PREFETCH]
    for f in files:
        _PREFETCH[f] = {"done": threading.Event(), "result": None, "proc": None}

    def run():
        for f in files:
            job = _PREFETCH[f]
            try:
                job["proc"] = start_worker(f, threads="1")
                out, err = job["proc"].communicate(timeout=1800)
                job["result"] = (job["proc"].returncode, out, err)
            except Exception:  # noqa: BLE001 - the test then runs its worker itself
                job["result"] = None
            job["done"].set()

    if files:
        threading.Thread(target=run, name="interp-prefetch", daemon=True).start()


@atexit.register
def _stop_prefetched() -> None:
    for job in _PREFETCH.values():
        proc = job["proc"]
        if proc is not None and proc.poll() is None:
            proc.kill()


def results(test_file: str, threads: str = "1") -> dict:
    """The results of test_file's interpreter worker: the prefetched run's, or a run started now."""
    job = _PREFETCH.get(os.path.abspath(test_file))
    if job is not None and job["done"].wait(timeout=1800) and job["result"] is not None:
        return results_of(*job["result"])
    proc = start_worker(test_file, threads=threads)
    out, err = proc.communicate(timeout=900)
    return results_of(proc.returncode, out, err)
