"""PNG plots of bench_decode_step.py results: tokens/s (and step time) against context length,
one line per cache (dense gpt-fast loop, our dense path, DMS at each CR, int8 variants), one
panel per batch size.

Usage: python benchmarks/plot_decode_step.py results/step_sweep.json [more.json ...] --out decode_tokens_per_s.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_rows(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [r for r in json.load(f)["rows"] if not r["cache"].endswith("@max")]
    return rows


def label(cache: str) -> str:
    if cache == "gptfast":
        return "dense (gpt-fast loop)"
    cr, _, store = cache.partition("-")
    name = "dense (ours)" if float(cr) == 1 else f"DMS CR {float(cr):g}"
    return name + (" + int8 KV" if store else "")


def plot(rows, out: str, metric: str = "tokens_per_s") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    for ax, B in zip(axes[0], batches):
        series = defaultdict(list)
        for r in rows:
            if r["batch"] == B:
                series[r["cache"]].append((r["ctx"], r[metric]))
        for cache in sorted(series, key=lambda c: (c != "gptfast", c)):
            pts = sorted(series[cache])
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                marker="o",
                label=label(cache),
                ls="--" if "int8" in cache else "-",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("tokens/s" if metric == "tokens_per_s" else "ms per decode step")
        ax.set_title(f"Llama-3-8B shapes, B={B}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default="decode_tokens_per_s.png")
    ap.add_argument("--metric", choices=["tokens_per_s", "step_ms"], default="tokens_per_s")
    a = ap.parse_args(argv)
    rows = load_rows(a.json)
    if not rows:
        raise SystemExit(f"no rows in {a.json}")
    print(plot(rows, a.out, a.metric))


if __name__ == "__main__":
    main()
