"""The evaluation's outputs: the printed tables, the metric-vs-CR plots and kept-fraction heat maps,
results.json (rewritten after every run, then final), --replot and --merge."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from .. import stats
from .methods import METHODS


def print_table(runs: List[Dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    cols = [("method", 9), ("req CR", 7), ("CR", 6), ("ppl", 8), ("KL", 8), ("reason", 7), ("needle", 7), ("vartrk", 7)]
    out.write(" ".join(f"{c:>{w}}" for c, w in cols) + "\n")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in runs:
        ppl = r.get("ppl") or {}
        row = [
            r["method"],
            num(r.get("requested_cr"), ".2f"),
            num(r.get("cr"), ".2f"),
            num(ppl.get("ppl"), ".3f"),
            num(ppl.get("kl"), ".4f"),
            num((r.get("reasoning") or {}).get("accuracy"), ".3f"),
            num((r.get("needle") or {}).get("accuracy"), ".3f"),
            num((r.get("vartrack") or {}).get("accuracy"), ".3f"),
        ]
        out.write(" ".join(f"{v:>{w}}" for v, (_, w) in zip(row, cols)) + "\n")


def plot_metrics(runs: List[Dict[str, Any]], out_dir: Path) -> List[str]:
    """One PNG per metric: the metric against CR, a line per method; vanilla as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("ppl", "ppl", "perplexity"),
        ("kl", "ppl", "KL(vanilla || method) nats/token"),
        ("accuracy", "reasoning", "reasoning accuracy"),
        ("accuracy", "needle", "needle accuracy"),
        ("accuracy", "vartrack", "variable-tracking recall"),
    ]
    paths = []
    for key, metric, ylabel in specs:
        pts = [(r["method"], r.get("cr") or 1.0, (r.get(metric) or {}).get(key)) for r in runs]
        pts = [p for p in pts if p[2] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m in METHODS:
            xs = sorted((x, y) for name, x, y in pts if name == m)
            if not xs:
                continue
            if m == "vanilla":
                ax.axhline(xs[0][1], ls="--", color="gray", label="vanilla")
            else:
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=m)
        ax.set_xlabel("compression ratio (tokens seen / KV kept)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = "kl" if key == "kl" else metric
        path = out_dir / f"{name}_vs_cr.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _jsonable(x):
    """Plain JSON types (the CompressionReport objects are dropped: their numbers are kept_per_layer_head)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "report"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def print_parallel(rows, out=None) -> None:
    out = out or sys.stdout
    if not rows:
        return
    out.write(
        "parallel sampling at equal KV memory (vanilla: 1 greedy answer; the others: N samples, majority vote):\n"
    )
    ref = next((r["kv_live_bytes_per_question"] for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        ratio = r["kv_live_bytes_per_question"] / ref if ref else None
        out.write(
            f"  {r['method']:<9} CR {r['cr'] or 1:.2f}, {r['samples_per_question']} sample(s): vote accuracy "
            f"{r['accuracy_vote']:.3f}, per-sample {r['accuracy_per_sample']:.3f}, KV "
            f"{r['kv_live_bytes_per_question'] / 2**10:.1f} KiB per question"
            + (f" ({ratio:.2f}x vanilla's)" if ratio is not None and r["method"] != "vanilla" else "")
            + "\n"
        )
        if ratio is not None and ratio > 1.1:
            out.write(
                f"  note: {r['method']} is NOT at equal memory: it reached only CR {r['cr'] or 1:.2f} on these "
                f"generations against the {r['samples_per_question']} samples it runs (sequences too short for "
                f"its window to matter); use longer generations (--reasoning-max-new) or fewer samples\n"
            )


def draw(results: Dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> Dict[str, List[str]]:
    """The metric-vs-CR plots and the kept-fraction heat maps, from a results dict (fresh or loaded
    from results.json). Skipped with a message when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log(
            "plots skipped: matplotlib is not installed (pip install matplotlib; or redraw elsewhere with "
            "python -m dms_flex.eval --replot results.json)"
        )
        return {"plots": [], "heatmaps": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    heatmaps = []
    for r in runs:
        kept = (r.get("ppl") or {}).get("kept_per_layer_head")
        if r["method"] == "vanilla" or not kept:
            continue
        report = stats.CompressionReport(per_layer_head=torch.tensor(kept))
        path = out_dir / f"kept_{r['method']}_cr{(r.get('cr') or report.ratio):.2f}.png"
        heatmaps.append(stats.plot_kept_heatmap(report, str(path), title=f"{r['method']} kept fraction"))
    return {"plots": plot_metrics(runs, out_dir), "heatmaps": heatmaps}


def parallel_rows(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The parallel-sampling table's rows: one per run that has a parallel-sampling result."""
    return [{"method": r["method"], "cr": r["cr"], **r["parallel"]} for r in runs if "parallel" in r]


def merge(paths: Sequence[str], out_dir: str) -> int:
    """One table and one set of plots from several results.json files (e.g. one process per baseline
    run side by side): runs are concatenated in file order, a (method, requested CR) pair seen twice
    keeps its first run (the vanilla and DMS runs every file repeats)."""
    merged: Dict[str, Any] = {"merged_from": [], "runs": [], "parallel": []}
    seen = set()
    for path in paths:
        try:  # a process killed before its first method finished leaves no file: merge the others
            res = json.loads(Path(path).read_text())
        except FileNotFoundError:
            print(f"{path}: missing (that process finished no method); skipped")
            continue
        except json.JSONDecodeError as e:
            print(f"{path}: not valid JSON ({e}); skipped")
            continue
        merged["merged_from"].append(str(path))
        if res.get("partial"):  # written after each run: the process stopped before its last method
            print(f"{path}: partial (the run stopped early): {len(res.get('runs') or [])} finished run(s) kept")
            merged.setdefault("partial_inputs", []).append(str(path))
            res.setdefault("parallel", parallel_rows(res.get("runs") or []))
        for k, v in res.items():
            if k not in ("runs", "parallel", "plots", "heatmaps", "partial"):
                merged.setdefault(k, v)
        for part, key in (("runs", "requested_cr"), ("parallel", "cr")):
            for r in res.get(part) or []:
                if (part, r["method"], r.get(key)) not in seen:
                    seen.add((part, r["method"], r.get(key)))
                    merged[part].append(r)
    if not merged["runs"]:
        raise ValueError(f"no runs to merge in {list(paths)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    return replot(str(out / "results.json"))


def replot(path: str) -> int:
    """Redraw the plots of a results.json next to it (e.g. on a machine with matplotlib)."""
    p = Path(path)
    results = json.loads(p.read_text())
    if results.get("quantization"):
        print(f"setting: {format_setting(results['quantization'])}")
    print_table(results["runs"])
    print_parallel(results.get("parallel"))
    results.update(draw(results, p.parent))
    p.write_text(json.dumps(results, indent=1, default=str))
    print(f"plots: {', '.join(results['plots'] + results['heatmaps'])}")
    return 0


def format_setting(q: Dict[str, Any]) -> str:
    kv = "K/V in the model dtype" if q["kv"] == "model" else "K/V int8 (one scale per token and KV head)"
    if q["kv"] == "int8":
        ints = [m for m, v in q["kv_by_method"].items() if v == "int8"]
        kv += f" for {', '.join(ints) or 'no method'}"
        if q.get("note"):
            kv += f"; {q['note']}"
    w = (
        "unquantized weights"
        if q["weights"] == "none"
        else (f"{q['weights']} weights ({q['quantized_weights']} linear layers of the model)")
    )
    return (
        f"{kv}; {w}, {q['model_dtype']}; KL/PPL reference {q['reference']} ({q['reference_dtype']}, "
        f"unquantized weights, full-precision K/V)"
    )


def write_partial(path: Path, results: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
    """Rewrite results.json with every run so far (marked partial), so a run stopped by a time limit still
    leaves the methods it finished."""
    partial = _jsonable({**results, "runs": runs, "partial": True})
    tmp = path.with_name(f".{path.name}.tmp")  # whole or not at all: a kill mid-write leaves the last one
    tmp.write_text(json.dumps(partial, indent=1, default=str))
    tmp.replace(path)


def write_final(path: Path, results: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The finished results.json, the tables and the plots; returns the results as written."""
    results = _jsonable(results)
    path.write_text(json.dumps(results, indent=1, default=str))  # first without plots: they may fail
    print(f"setting: {format_setting(results['quantization'])}")
    print_table(results["runs"])
    print_parallel(results.get("parallel"))
    results.update(draw(results, path.parent, log))
    path.write_text(json.dumps(results, indent=1, default=str))
    log(
        f"results: {path}"
        + (f"; plots: {', '.join(results['plots'] + results['heatmaps'])}" if results["plots"] else "")
    )
    return results
