"""The command line of python -m dms_flex.eval: the parser (flags grouped by concern), the checks that
turn a bad value into one usage error naming its flag, and `main`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .. import quant
from . import __doc__ as DESCRIPTION
from . import data
from .methods import METHODS
from .report import merge, replot
from .runner import DEFAULT_REASONING_TASKS, run

METRICS = ("ppl", "reasoning", "needle", "vartrack")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dms_flex.eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for add in (
        _add_general,
        _add_dms,
        _add_baselines,
        _add_perplexity,
        _add_reasoning,
        _add_long_context,
        _add_quantization,
        _add_misc,
    ):
        add(p)
    return p


def _add_general(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="Hugging Face-format folder; default: the embedded SmolLM2-135M-Instruct with its packaged DMS adapter",
    )
    p.add_argument(
        "--adapter", help="a DMS adapter folder (python -m dms_flex.pretrained export-adapter) applied to --model"
    )
    p.add_argument(
        "--no-adapter",
        action="store_true",
        help="the embedded model without its packaged adapter (untrained decisions)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--cr", default="2,4", help="requested compression ratios (comma list)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {METRICS}")
    p.add_argument("--out", default="eval_out", help="folder for results.json and the plots")


def _add_dms(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dms-window",
        action="append",
        default=[],
        metavar="[CR=]W",
        help="DMS window: W for every DMS run, CR=W for the run of one requested CR (repeatable)",
    )
    p.add_argument(
        "--dms-alpha-offset",
        action="append",
        default=[],
        metavar="CR=OFFSET",
        help="DMS alpha_offset to use for a requested CR (repeatable)",
    )
    p.add_argument(
        "--dms-checkpoint",
        action="append",
        default=[],
        metavar="[CR=]DIR",
        help="a retrofit checkpoint to run DMS with: DIR for every DMS run (loaded once; with "
        "--dms-calibrate its alpha_offset is calibrated per requested CR), CR=DIR for the run of one "
        "requested CR, with that checkpoint's own settings (repeatable)",
    )
    p.add_argument(
        "--dms-calibrate",
        action="store_true",
        help="find alpha_offset per requested CR by bisection on the perplexity windows (of --model's "
        "DMS decisions, or of --dms-checkpoint DIR's)",
    )
    p.add_argument(
        "--no-match-dms-cr",
        dest="match_dms_cr",
        action="store_false",
        help="run the baselines at the requested CR instead of DMS's achieved CR",
    )
    p.add_argument("--dms-cached", action="store_true", help="perplexity of vanilla/DMS through the cache too")
    p.add_argument(
        "--match-dms",
        metavar="RESULTS_JSON",
        help="run the baselines, metric by metric, at the CR the DMS runs of an earlier run (same inputs) "
        "achieved on each metric's inputs: for baselines evaluated in their own process",
    )


def _add_baselines(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sinks", type=int, default=4, help="StreamingLLM attention sinks")
    p.add_argument("--heavy-fraction", type=float, default=0.5, help="H2O's heavy-hitter share of the budget")


def _add_perplexity(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--texts",
        help=f"text sources, a comma list of {data.TEXT_SOURCES} (default: all of them, or none with --text-file)",
    )
    p.add_argument(
        "--text-file",
        metavar="PATH",
        help="your own text for perplexity and the haystacks: a UTF-8 file, or a folder of .txt files (joined); "
        "with --texts, evaluated next to those sources",
    )
    p.add_argument("--ppl-windows", type=int, default=1, help="windows per text source")
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--ppl-prefix", type=int, default=32, help="tokens of each window that are context only")
    p.add_argument("--batch-size", type=int, default=8)


def _add_reasoning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reasoning-tasks", default=",".join(DEFAULT_REASONING_TASKS))
    p.add_argument("--reasoning-n", type=int, default=8, help="problems per task")
    p.add_argument("--reasoning-max-new", type=int, default=16)
    p.add_argument("--reasoning-shots", type=int, default=3, help="solved examples shown before each question")
    p.add_argument(
        "--reasoning-default-difficulty",
        dest="easy_tasks",
        action="store_false",
        help="use reasoning-gym's default difficulty instead of the small-sum setting of basic_arithmetic",
    )
    p.add_argument(
        "--parallel-samples",
        type=int,
        default=0,
        metavar="N",
        help="also run N-sample majority voting with each compressed method at CR N vs 1 vanilla answer",
    )
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)


def _add_long_context(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="256,512", help="context lengths of the needle / variable tasks")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=1, help="items per (length, depth)")
    p.add_argument("--haystack", help="text source for haystacks (default: the first prose source found)")
    p.add_argument("--hops", type=int, default=2, help="variable-tracking chain links")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])


def _add_quantization(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv",
        choices=["model", "int8"],
        default="model",
        help="K/V storage of vanilla and DMS, as the served cache would hold it: the model dtype, or int8 "
        "with one float32 scale per token and KV head (teacher-forced perplexity through the same "
        "round trip; the baselines' PolicyState has no int8 storage: they stay in the model dtype)",
    )
    p.add_argument(
        "--weight-quant",
        choices=list(quant.WEIGHT_QUANT),
        default="none",
        help="weight-only quantization (torchao) of the evaluated model's linear layers, DMS checkpoints "
        "included; int4 runs in bfloat16 (the model is cast). The KL/PPL reference stays unquantized",
    )
    p.add_argument(
        "--reference",
        metavar="DIR",
        help="the KL reference (vanilla) model's folder when it is not --model (e.g. --model is an "
        "all-weights retrofit and DIR the original); default: --model, unquantized, full-precision KV",
    )
    p.add_argument(
        "--attention",
        choices=["dense", "flex", "auto"],
        default="dense",
        help="attention of the full-sequence forwards (default dense: exact, nothing to compile)",
    )


def _add_misc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the table and plots of an earlier run")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS_JSON",
        help="combine several runs' results.json into --out (one table and one set of plots)",
    )


# ============================================================================ checks and parsing of the values
def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    _check_ranges(p, args)
    _parse_lists(p, args)
    _parse_dms(p, args)
    args.cr = sorted(set(args.cr))
    if not (1 <= args.ppl_prefix < args.ppl_len):
        p.error("--ppl-prefix must be in [1, --ppl-len)")
    if args.text_file:  # a missing, empty or non-UTF-8 text is a usage error, found before the model loads
        try:
            data.user_text(args.text_file)
        except (OSError, ValueError) as e:
            p.error(str(e))
    return args


def _check_ranges(p: argparse.ArgumentParser, args) -> None:
    for flag, value, low in (
        ("--ppl-windows", args.ppl_windows, 1),
        ("--ppl-len", args.ppl_len, 2),
        ("--batch-size", args.batch_size, 1),
        ("--reasoning-n", args.reasoning_n, 1),
        ("--reasoning-max-new", args.reasoning_max_new, 1),
        ("--reasoning-shots", args.reasoning_shots, 0),
        ("--trials", args.trials, 1),
        ("--hops", args.hops, 1),
        ("--sinks", args.sinks, 0),
        ("--parallel-samples", args.parallel_samples, 0),
    ):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if not (0 <= args.heavy_fraction <= 1):
        p.error(f"--heavy-fraction must be in [0, 1], got {args.heavy_fraction}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (0 < args.top_p <= 1):
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give the folder for results.json and the plots")


def _parse_lists(p: argparse.ArgumentParser, args) -> None:
    """The comma lists: names checked against what is known, numbers finite and in range."""
    args.methods = _names(p, args.methods, METHODS, "method(s)")
    args.metrics = _names(p, args.metrics, METRICS, "metric(s)")
    if args.texts is None:
        args.texts = "" if args.text_file else ",".join(data.TEXT_SOURCES)
    args.texts = _names(p, args.texts, data.TEXT_SOURCES, "text source(s)")
    args.cr = _floats(p, args.cr, "--cr", lambda c: c >= 1, "finite compression ratios >= 1", empty_ok=True)
    if args.parallel_samples and float(args.parallel_samples) not in args.cr:
        args.cr.append(float(args.parallel_samples))
    args.lengths = [
        int(x)
        for x in _floats(p, args.lengths, "--lengths", lambda n: n >= 1 and n == int(n), "token counts (integers >= 1)")
    ]
    args.depths = _floats(p, args.depths, "--depths", lambda d: 0 <= d <= 1, "depths in [0, 1]")


def _parse_dms(p: argparse.ArgumentParser, args) -> None:
    """--dms-window / --dms-alpha-offset / --dms-checkpoint: one value for all DMS runs, CR=VALUE per requested
    CR (each such CR joins --cr)."""
    whole = [w for w in args.dms_window if "=" not in w]
    if len(whole) > 1 or any(not w.isdigit() for w in whole):
        p.error(f"--dms-window takes one W >= 0 for all runs (and CR=W per run), got {whole}")
    args.dms_window_at = _per_cr(p, args, [w for w in args.dms_window if "=" in w], _finite(int, 0), "--dms-window")
    args.dms_window = int(whole[0]) if whole else None
    args.dms_alpha_offset = _per_cr(p, args, args.dms_alpha_offset, _finite(float), "--dms-alpha-offset")
    whole_ckpt = [c for c in args.dms_checkpoint if _cr_key(c) is None]  # a DIR may contain '=' (not after a number)
    if len(whole_ckpt) > 1 or any(not c for c in whole_ckpt):
        p.error(f"--dms-checkpoint takes one DIR for all DMS runs (and CR=DIR per run), got {whole_ckpt}")
    args.dms_checkpoint_all = whole_ckpt[0] if whole_ckpt else None
    args.dms_checkpoint = _per_cr(
        p, args, [c for c in args.dms_checkpoint if _cr_key(c) is not None], str, "--dms-checkpoint"
    )


def _floats(p, s, flag, ok=lambda x: True, allowed="numbers", empty_ok=False):
    """A comma list of finite numbers that pass `ok`; p.error (exit 2) names the flag otherwise."""
    out = []
    for x in s.split(","):
        if not x.strip():
            continue
        try:
            v = float(x)
        except ValueError:
            p.error(f"{flag}: {x.strip()!r} is not a number (want a comma list of {allowed})")
        if not math.isfinite(v) or not ok(v):
            p.error(f"{flag}: {x.strip()!r} is out of range (want a comma list of {allowed})")
        out.append(v)
    if not out and not empty_ok:
        p.error(f"{flag} is empty (want a comma list of {allowed})")
    return out


def _names(p, s, allowed, what):
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad:
        p.error(f"unknown {what} {bad}; known: {allowed}")
    return out


def _cr_key(it):
    """The CR of a CR=VALUE item, None when the text before '=' is not a number (or there is no '=')."""
    k, sep, _ = it.partition("=")
    try:
        return float(k) if sep else None
    except ValueError:
        return None


def _finite(conv, low=None):
    def f(text):
        v = conv(text)
        if not math.isfinite(v) or (low is not None and v < low):
            raise ValueError(text)
        return v

    return f


def _per_cr(p, args, items, conv, flag):
    """{CR: value} of CR=VALUE items; each CR not yet in args.cr is appended to it."""
    out = {}
    for it in items:
        k = _cr_key(it)
        if k is None:
            p.error(f"{flag} wants CR=VALUE, got {it!r}")
        if not (math.isfinite(k) and k >= 1):
            p.error(f"{flag}: the CR in {it!r} must be a finite number >= 1")
        try:
            out[k] = conv(it.partition("=")[2])
        except ValueError:
            p.error(f"{flag}: bad value in {it!r}")
        if k not in args.cr:
            args.cr.append(k)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.replot:
            return replot(args.replot)
        if args.merge:
            return merge(args.merge, args.out)
        run(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
