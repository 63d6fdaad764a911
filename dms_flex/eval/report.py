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
from .intervals import format_interval, mean_interval, paired_interval
from .methods import METHODS


GROUPS = (("ppl", "ppl"), ("reasoning", "reason"), ("needle", "needle"), ("vartrack", "vartrk"))
BYTES_TOLERANCE = 0.05  # a baseline cell whose KV bytes differ from DMS's by more than this is marked


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def memory(run: Dict[str, Any], group: str):
    """(token-weighted CR, live KV bytes per sequence) of one run on one metric's inputs, or None (an older
    results.json without them)."""
    r = run.get(group) or {}
    if "kv_live_bytes" not in r or not r.get("sequences"):
        return None
    return r.get("cr_slots"), r["kv_live_bytes"] / r["sequences"]


def bytes_off(run: Dict[str, Any], group: str, runs: Sequence[Dict[str, Any]]):
    """A baseline cell's KV bytes / those of the DMS run for the same requested CR on the same metric
    (None when either is missing or the run is not a baseline)."""
    if run["method"] in ("vanilla", "dms"):
        return None
    dms = next((r for r in runs if r["method"] == "dms" and r.get("requested_cr") == run.get("requested_cr")), None)
    mine, ref = memory(run, group), dms and memory(dms, group)
    if not mine or not ref or not ref[1]:
        return None
    return mine[1] / ref[1]


def _memory_cell(run, group, runs) -> str:
    mem = memory(run, group)
    if mem is None:
        return "-"
    cr, per_seq = mem
    ratio = bytes_off(run, group, runs)
    mark = "!" if ratio is not None and abs(ratio - 1) > BYTES_TOLERANCE else ""
    return f"{_num(cr, '.2f')}x {per_seq / 2**10:.0f}K{mark}"


def _values(run) -> Dict[str, Any]:
    ppl = run.get("ppl") or {}
    return {
        "ppl": ppl.get("ppl"),
        "kl": ppl.get("kl"),
        "reasoning": (run.get("reasoning") or {}).get("accuracy"),
        "needle": (run.get("needle") or {}).get("accuracy"),
        "vartrack": (run.get("vartrack") or {}).get("accuracy"),
    }


def print_table(runs: List[Dict[str, Any]], out=None) -> None:
    """One row per run: each metric's value, then the CR it ran at on that metric's inputs and its live KV
    bytes per sequence (K = KiB); '!' marks a baseline cell more than 5% away from DMS's bytes at the same
    requested CR. Then the accuracies' 95% intervals and their paired differences to vanilla."""
    out = out or sys.stdout
    present = [g for g, _ in GROUPS if any(g in r for r in runs)] or ["ppl"]
    cols = [("method", 9), ("req CR", 7)]
    for g, short in GROUPS:
        if g in present:
            cols += ([("ppl", 8), ("KL", 8)] if g == "ppl" else [(short, 7)]) + [(f"{short} mem", 14)]
    out.write(" ".join(f"{c:>{w}}" for c, w in cols) + "\n")
    for r in runs:
        v = _values(r)
        row = [r["method"], _num(r.get("requested_cr"), ".2f")]
        for g, _ in GROUPS:
            if g in present:
                row += [_num(v["ppl"], ".3f"), _num(v["kl"], ".4f")] if g == "ppl" else [_num(v[g], ".3f")]
                row.append(_memory_cell(r, g, runs))
        out.write(" ".join(f"{x:>{w}}" for x, (_, w) in zip(row, cols)) + "\n")
    out.write(
        "mem: the CR each cell ran at on that metric's own inputs (tokens seen / KV slots held) and its live KV "
        "bytes per sequence; '!' = more than 5% away from DMS's bytes at the same requested CR\n"
    )
    for line in interval_lines(runs):
        out.write(line + "\n")


def interval_lines(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """Per accuracy metric with per-item scores: each run's mean with its 95% interval and, where vanilla
    answered the same items, the paired difference to vanilla in points with its 95% interval."""
    lines = []
    for g, _ in GROUPS[1:]:
        scored = [r for r in runs if (r.get(g) or {}).get("scores")]
        if not scored:
            continue
        van = next((r[g]["scores"] for r in scored if r["method"] == "vanilla"), None)
        lines.append(f"{g} (n = {len(scored[0][g]['scores'])}), mean [95% interval]; minus vanilla, points:")
        for r in scored:
            sc = r[g]["scores"]
            mem = memory(r, g)
            line = f"  {r['method']:<9} CR {_num(mem and mem[0], '.2f'):>6}  {format_interval(mean_interval(sc))}"
            if van is not None and r["method"] != "vanilla" and len(van) == len(sc):
                line += f"   {format_interval(paired_interval(sc, van), scale=100, digits=1)}"
            lines.append(line)
    return lines


def markdown_table(runs: Sequence[Dict[str, Any]]) -> str:
    """The table as Markdown for benchmarks/RESULTS.md: each cell 'value (CR, KiB per sequence)', the best
    compressed method per requested CR and metric in bold, a marked cell (more than 5% away from DMS's
    bytes) with a dagger."""
    present = [g for g, _ in GROUPS if any(g in r for r in runs)] or ["ppl"]
    heads = ["method", "req. CR"]
    keys = []
    for g, _ in GROUPS:
        if g in present:
            keys += [("ppl", "ppl", min), ("kl", "ppl", min)] if g == "ppl" else [(g, g, max)]
    heads += [k if k != "reasoning" else "reasoning (95% int.)" for k, _, _ in keys]
    best = {}
    for key, _, pick in keys:
        for cr in {r.get("requested_cr") for r in runs if r["method"] != "vanilla"}:
            vals = [_values(r)[key] for r in runs if r["method"] != "vanilla" and r.get("requested_cr") == cr]
            vals = [x for x in vals if x is not None]
            if len(vals) > 1:
                best[(key, cr)] = pick(vals)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in runs:
        cells = [r["method"], "-" if r.get("requested_cr") is None else f"{r['requested_cr']:g}"]
        for key, group, _ in keys:
            val = _values(r)[key]
            if val is None:
                cells.append("-")
                continue
            text = f"{val:.4f}" if key == "kl" else f"{val:.3f}"
            if r["method"] != "vanilla" and best.get((key, r.get("requested_cr"))) == val:
                text = f"**{text}**"
            if key == "reasoning" and (r.get(group) or {}).get("scores"):
                iv = mean_interval(r[group]["scores"])
                text += f" [{iv['low']:.3f}, {iv['high']:.3f}]"
            mem = memory(r, group)
            if mem is not None and key != "kl":
                ratio = bytes_off(r, group, runs)
                mark = " †" if ratio is not None and abs(ratio - 1) > BYTES_TOLERANCE else ""
                text += f" ({_num(mem[0], '.2f')}x, {mem[1] / 2**10:.0f} KiB{mark})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nEach cell: value (the CR it ran at on that metric's own inputs = tokens seen / KV slots held; live KV "
        "KiB per sequence). † = more than 5% away from DMS's bytes at the same requested CR."
    )
    return "\n".join(lines + [""] + interval_lines(runs)) + "\n"


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
        # each point at the CR the run had on this metric's inputs (a baseline matched to DMS metric by metric)
        pts = [
            (r["method"], (memory(r, metric) or (None,))[0] or r.get("cr") or 1.0, (r.get(metric) or {}).get(key))
            for r in runs
        ]
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
        mine, theirs = merged.get("inputs") or {}, res.get("inputs") or {}
        differ = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if differ:  # cells of one table must share their inputs
            print(f"{path}: WARNING: its {', '.join(differ)} inputs differ from the first file's: not comparable")
            merged.setdefault("inputs_differ", []).append(str(path))
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
    (p.parent / "table.md").write_text(markdown_table(results["runs"]))
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
    (path.parent / "table.md").write_text(markdown_table(results["runs"]))
    results.update(draw(results, path.parent, log))
    path.write_text(json.dumps(results, indent=1, default=str))
    log(
        f"results: {path}"
        + (f"; plots: {', '.join(results['plots'] + results['heatmaps'])}" if results["plots"] else "")
    )
    return results
