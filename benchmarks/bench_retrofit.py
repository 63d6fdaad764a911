"""The 8B retrofit at full size on random weights: tokens/s per GPU, step-time split, peak memory (issue 20).

Every grid point is one run of the recipe itself, `tune run [--nproc_per_node N] dms_retrofit --config MODEL
checkpoint_dir=null random_init=true benchmark=true ...` in a subprocess (dms_flex/retrofit/random_init.py:
the config's architecture with random weights, synthetic 32,768-token packed rows with document ids, nothing
saved), whose benchmark.json (dms_flex/retrofit/timing.py) is collected into one JSON file (--out), rewritten
after each point. Variants: `all` (every weight trains: the config's borrowed decision, zeroing_steps=0 so
every step is a CR step; a frozen bf16 teacher copy), `adapter` (dms.decision=adapter, train_adapter_only: the
frozen bf16 base is its own teacher), `adapter_int8` / `adapter_nf4` (the frozen base held quantized).
The distillation is always the recipe's chunked one (kd_chunk_size, default 1024 tokens a chunk).

--fit (issue 20 item 3): per model and variant on ONE GPU, the longest row at batch 1 and the largest
micro-batch at --fit-batch-len that fit: probes (2 steps each, a subprocess each, so that an out-of-memory
error ends only its probe) at --fit-lengths, then a bisection to --fit-granularity tokens, first guesses from
a least-squares fit of the probes so far (dms_flex/retrofit/memory_fit.py); every probe, out-of-memory ones
included, goes into --out, and the fitted COEFFICIENTS entries and each probe's error are printed.
--fit-report A.json B.json: the fit alone, from JSON files this script wrote.

Commands for the next GPU session (from the repository root, with the pure-Python wheels the device image
lacks on PYTHONPATH: torchtune 0.6.1, torchao 0.13.0, omegaconf; benchmarks/h200/README.md):

  # nvidia-h200 (1 GPU, ~25 min): both shapes, adapter variants, checkpointing on, eager and compiled
  python3 benchmarks/bench_retrofit.py --models llama3_8b,qwen2_5_7b --variants adapter,adapter_int8,adapter_nf4 \\
      --ckpt on --compile off,on --out benchmarks/results/bench_retrofit_h200.json
  # nvidia-h200 (1 GPU): the limits and the memory fit (item 3), Llama-3-8B then Qwen2.5-7B
  python3 benchmarks/bench_retrofit.py --fit --models llama3_8b --variants adapter,adapter_int8,adapter_nf4 \\
      --out benchmarks/results/bench_retrofit_fit_llama3_8b.json
  # nvidia-h200-x2 (2 GPUs, FSDP2): every weight trains (does not fit one H200) and the adapter, both shapes
  python3 benchmarks/bench_retrofit.py --nproc 2 --models llama3_8b,qwen2_5_7b --variants all,adapter \\
      --ckpt on --compile off,on --out benchmarks/results/bench_retrofit_h200x2.json
  # nvidia-h200-x2, two 1-GPU points at once (one per GPU): --jobs 2 with --nproc 1
  python3 benchmarks/bench_retrofit.py --jobs 2 --models llama3_8b,qwen2_5_7b --variants adapter --ckpt on,off \\
      --out benchmarks/results/bench_retrofit_ckpt.json
  python3 benchmarks/bench_retrofit.py --fit-report benchmarks/results/bench_retrofit_fit_*.json

CPU smoke (tests/test_bench_retrofit.py): --tiny runs the same grid in this process on 2-layer, width-64
models of each shape's family (random_init_config), 128-token rows, fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("llama3_8b", "qwen2_5_7b")
VARIANTS = ("all", "adapter", "adapter_int8", "adapter_nf4")
VARIANT_OVERRIDES = {
    "all": ["train_adapter_only=false", "zeroing_steps=0"],
    "adapter": ["dms.decision=adapter", "train_adapter_only=true"],
    "adapter_int8": ["dms.decision=adapter", "train_adapter_only=true", "quant.base_weights=int8"],
    "adapter_nf4": ["dms.decision=adapter", "train_adapter_only=true", "quant.base_weights=nf4"],
}
TINY = [
    "random_init_config={num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2, "
    "intermediate_size: 128, vocab_size: 512}",
    "synthetic_data={min_tokens: 16, max_tokens: 64}",
    "dms.window=16",
    "device=cpu",
    "dtype=fp32",
    "kd_chunk_size=64",
]
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")
NVIDIA_SCHEDULE = {"steps": 544, "gpus": 8, "rows_per_gpu": 1, "seq_len": 32768, "hours_8xH100": 4.0}


def _flags(text: str) -> List[bool]:
    out = []
    for v in text.split(","):
        if v not in ("on", "off"):
            raise SystemExit(f"expected on/off values, got {v!r}")
        out.append(v == "on")
    return out


def _names(text: str, allowed) -> List[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    return names


def overrides(
    model: str,
    variant: str,
    *,
    ckpt: bool,
    compile: bool,
    seq_len: int,
    batch: int,
    steps: int,
    warmup: int,
    out_dir: Path,
    tiny: bool,
    extra: List[str] = (),
) -> List[str]:
    """The recipe's key=value overrides of one point."""
    return [
        "checkpoint_dir=null",
        "random_init=true",
        "benchmark=true",
        f"benchmark_warmup_steps={warmup}",
        f"max_steps={warmup + steps}",
        f"max_seq_len={seq_len}",
        f"batch_size={batch}",
        "gradient_accumulation_steps=1",
        f"enable_activation_checkpointing={'true' if ckpt else 'false'}",
        f"compile={'true' if compile else 'false'}",
        f"output_dir={out_dir}",
        "overwrite=true",
        *VARIANT_OVERRIDES[variant],
        *(TINY if tiny else []),
        *extra,
    ]


def tune_cmd() -> List[str]:
    exe = shutil.which("tune")
    return [exe] if exe else [sys.executable, "-m", "torchtune._cli.tune"]


def run_subprocess(
    model: str, args: List[str], nproc: int, gpu: Optional[int], timeout: float, log: Path, expandable: bool = False
):
    """(returncode, out-of-memory?) of `tune run dms_retrofit --config MODEL ARGS`, output to `log`."""
    cmd = tune_cmd() + ["run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    cmd += ["dms_retrofit", "--config", model, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the repository and recipes/ importable without `pip install -e .` (the GPU machines' bare image)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "recipes"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    if expandable:  # as NVIDIA's launch scripts set it; off by default: the recipe as users run it
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    return rc, rc != 0 and any(m in text for m in OOM_MARKERS)


def run_in_process(model: str, args: List[str]) -> int:
    """The recipe in this process (CPU smoke): the packaged yaml plus the overrides, as tune run builds it."""
    from omegaconf import OmegaConf

    import dms_retrofit
    from dms_flex.retrofit.config_checks import CONFIG_DIR, resolve_paths

    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / f"{model}.yaml"), OmegaConf.from_dotlist(list(args)))
    resolve_paths(cfg)
    recipe = dms_retrofit.DMSRetrofitRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return 0


class Runner:
    """Runs points and keeps every record in --out (rewritten after each one)."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work or tempfile.mkdtemp(prefix="bench_retrofit_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.records: List[Dict[str, Any]] = []
        self.t0 = time.time()

    def point(self, model, variant, *, ckpt, compile, seq_len, batch, steps, warmup, nproc, gpu=None, tag=""):
        name = f"{model}-{variant}-ckpt{int(ckpt)}-compile{int(compile)}-T{seq_len}-B{batch}-n{nproc}{tag}"
        out_dir = self.work / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        args = overrides(
            model, variant, ckpt=ckpt, compile=compile, seq_len=seq_len, batch=batch, steps=steps, warmup=warmup,
            out_dir=out_dir, tiny=self.args.tiny, extra=self.args.override,
        )  # fmt: skip
        t = time.time()
        if self.args.in_process:
            rc, oom, log = run_in_process(model, args), False, None
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            log = self.work / f"{name}.log"
            rc, oom = run_subprocess(model, args, nproc, gpu, self.args.timeout, log, self.args.expandable_segments)
        record: Dict[str, Any] = {}
        if rc == 0 and (out_dir / "benchmark.json").is_file():
            record = json.loads((out_dir / "benchmark.json").read_text())
        record.update(
            model=model, variant=variant, seq_len=seq_len, batch_size=batch, activation_checkpointing=ckpt,
            compile=compile, world_size=record.get("world_size", nproc), returncode=rc, oom=oom,
            wall_s=round(time.time() - t, 1), log=str(log) if log else None,
        )  # fmt: skip
        record.setdefault("shape", shape_of(model, self.args.tiny))
        self.records.append(record)
        self.save()
        status = "OOM" if oom else ("ok" if rc == 0 else f"FAILED rc={rc} (see {log})")
        tps = record.get("tokens_per_s_per_gpu")
        print(
            f"[{time.time() - self.t0:6.0f}s] {name}: {status}"
            + (f", {tps:,.0f} tokens/s/GPU, peak {record['peak_reserved_GiB']:.1f} GiB" if tps else ""),
            flush=True,
        )
        return record

    def save(self, extra: Optional[Dict[str, Any]] = None) -> None:
        if not self.args.out:
            return
        data = {"command": sys.argv, "records": self.records, **(extra or {})}
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{self.args.out}.tmp"
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.args.out)


def shape_of(model: str, tiny: bool) -> str:
    """memory_fit.shape_key of a packaged config's random architecture (for records without benchmark.json)."""
    from omegaconf import OmegaConf

    from dms_flex.retrofit import memory_fit, random_init
    from dms_flex.retrofit.config_checks import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / f"{model}.yaml")
    if tiny:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([TINY[0]]))
    return memory_fit.shape_key(random_init.architecture(cfg))


# ---- the grid ------------------------------------------------------------------------------------------
def grid(args, runner: Runner) -> None:
    points = list(itertools.product(args.models, args.variants, args.ckpt, args.compile))
    if args.nproc > 1:
        dropped = [p for p in points if p[1] in ("adapter_int8", "adapter_nf4")]
        points = [p for p in points if p not in dropped]
        if dropped:
            print(f"skipped (a quantized base runs on one device): {len({p[1] for p in dropped})} variant(s)")
    kw = dict(seq_len=args.seq_len, batch=args.batch, steps=args.steps, warmup=args.warmup, nproc=args.nproc)
    if args.jobs > 1 and args.nproc == 1 and not args.in_process:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(runner.point, m, v, ckpt=c, compile=k, gpu=i % args.jobs, **kw)
                for i, (m, v, c, k) in enumerate(points)
            ]
            for f in futures:
                f.result()
    else:
        for m, v, c, k in points:
            runner.point(m, v, ckpt=c, compile=k, **kw)
    print(summary_table(runner.records))


def summary_table(records: List[Dict[str, Any]]) -> str:
    """A markdown table: tokens/s per GPU, step time, the split, peak memory, and the hours NVIDIA's schedule
    (544 steps of one 32,768-token row on each of 8 GPUs) would take at this speed per GPU."""
    tokens = NVIDIA_SCHEDULE["steps"] * NVIDIA_SCHEDULE["gpus"] * NVIDIA_SCHEDULE["rows_per_gpu"]
    tokens *= NVIDIA_SCHEDULE["seq_len"]
    lines = [
        "| model | variant | GPUs | ckpt | compile | row x batch | tokens/s/GPU | s/step | split (ms) | "
        "peak reserved GiB | h for 544 steps on 8 GPUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tps = r.get("tokens_per_s_per_gpu")
        split = r.get("rank0", {}).get("split_ms") or {}
        split_text = ", ".join(f"{k} {v:.0f}" for k, v in split.items()) or "-"
        status = "OOM" if r.get("oom") else ("failed" if r.get("returncode") else "")
        hours = f"{tokens / (tps * NVIDIA_SCHEDULE['gpus']) / 3600:.2f}" if tps else "-"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['world_size']} | {'on' if r['activation_checkpointing'] else 'off'}"
            f" | {'on' if r['compile'] else 'off'} | {r['seq_len']} x {r['batch_size']} | "
            f"{f'{tps:,.0f}' if tps else status} | {r.get('step_s') or 0:.2f} | {split_text} | "
            f"{r.get('peak_reserved_GiB') or 0:.1f} | {hours} |"
        )
    return "\n".join(lines)


# ---- --fit: the limits and the memory model ------------------------------------------------------------------
def limit_search(
    fits: Callable[[int], bool],
    known_ok: int,
    guess: int,
    step: int,
    known_bad: Optional[int] = None,
    max_probes: int = 8,
) -> int:
    """The largest multiple of `step` (>= known_ok, which fits; < known_bad, which does not) for which
    fits(value) is true, assuming fitting is monotone: probe the guess, gallop up from a fit (step, 2 step,
    4 step, ...) until a value does not fit, then bisect. After max_probes probes: the largest value seen to fit."""
    lo, hi = known_ok, known_bad
    v = max(guess // step * step, known_ok + step)
    if hi is not None and v >= hi:
        v = (lo + hi) // 2 // step * step
    stride = step
    for _ in range(max_probes):
        if v <= lo or (hi is not None and hi - lo <= step):
            break
        if fits(v):
            lo = v
            if hi is None:
                v, stride = lo + stride, stride * 2
                continue
        else:
            hi = v
        v = (lo + hi) // 2 // step * step
    return lo


def fit_limits(args, runner: Runner) -> None:
    from dms_flex.retrofit import memory_fit

    summary = []
    for model, variant, ckpt, compile in itertools.product(args.models, args.variants, args.ckpt, args.compile):
        kw = dict(ckpt=ckpt, compile=compile, steps=1, warmup=1, nproc=1)
        group = []

        def probe(seq_len: int, batch: int) -> bool:
            r = runner.point(model, variant, seq_len=seq_len, batch=batch, tag="-fit", **kw)
            group.append(r)
            if r.get("returncode") and not r.get("oom"):
                raise SystemExit(f"probe failed for another reason than memory: see {r.get('log')}")
            return not r.get("oom")

        ok_len = 0
        for L in args.fit_lengths:  # measurements at fixed sizes first (they anchor the fit)
            if not probe(L, 1):
                break
            ok_len = L
        if ok_len == 0:
            summary.append(f"{model} {variant}: not even {args.fit_lengths[0]} tokens fit")
            continue
        cap = capacity_bytes(group, args)

        def guess(limit_of_tokens: Callable[[int], int]) -> int:
            fitted = memory_fit.fit(group).get(memory_fit.record_key(group[0]))
            return limit_of_tokens(fitted.model.max_tokens(cap)) if fitted and cap else 0

        bad = group[-1]["seq_len"] if group[-1].get("oom") else None  # a fixed length that did not fit
        longest = limit_search(
            lambda L: probe(L, 1), ok_len, guess(lambda t: t), args.fit_granularity, bad, args.fit_probes
        )
        B = args.fit_batch_len
        batch = 0
        if B <= longest:  # batch 1 of B-token rows fits; the search starts from there
            batch = limit_search(lambda b: probe(B, b), 1, guess(lambda t: t // B), 1, None, args.fit_probes)
        summary.append(
            f"{model} {variant} ckpt={'on' if ckpt else 'off'} compile={'on' if compile else 'off'}: longest row "
            f"at batch 1: {longest:,} tokens{_bracket(group, longest, 'seq_len', 1)}; largest micro-batch of "
            f"{B:,}-token rows: {batch}{_bracket(group, batch, 'batch_size', B)}"
        )
    report_fit(runner.records, args)
    print("\n".join(summary))
    runner.save({"limits": summary})


def _bracket(group: List[Dict[str, Any]], found: int, field: str, fixed: int) -> str:
    """What bounds a search's answer: the smallest probe above it that ran out of memory, or that none did
    (the probes ran out first, so `found` is a lower bound of the limit)."""
    other = "batch_size" if field == "seq_len" else "seq_len"
    above = [r[field] for r in group if r.get("oom") and r[other] == fixed and r[field] > found]
    return f" ({min(above):,} did not fit)" if above else " (a lower bound: no larger probe ran out of memory)"


def capacity_bytes(records: List[Dict[str, Any]], args) -> Optional[float]:
    if args.capacity_gib:
        return args.capacity_gib * 2**30
    totals = [r["device_total_GiB"] for r in records if r.get("device_total_GiB")]
    return totals[0] * 2**30 if totals else None


def report_fit(records: List[Dict[str, Any]], args) -> Dict:
    from dms_flex.retrofit import memory_fit

    cap = capacity_bytes(records, args)
    fits = memory_fit.fit(records, capacity_GiB=cap / 2**30 if cap else None)
    print(memory_fit.report(fits))
    print("COEFFICIENTS entries for dms_flex/retrofit/memory_fit.py:")
    print("\n".join(memory_fit.table_lines(fits)))
    return fits


# ---- command line -------------------------------------------------------------------------------------------
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="packaged configs: llama3_8b,qwen2_5_7b")
    ap.add_argument("--variants", default="adapter", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--ckpt", default="on", help="activation checkpointing: on,off")
    ap.add_argument("--compile", default="off", help="compile=true: on,off")
    ap.add_argument("--seq-len", type=int, default=32768, help="tokens per packed row (default 32,768)")
    ap.add_argument("--batch", type=int, default=1, help="rows per GPU and micro-step")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per point")
    ap.add_argument("--warmup", type=int, default=1, help="steps before them (compilation, allocator warm-up)")
    ap.add_argument("--nproc", type=int, default=1, help="GPUs per point (FSDP2 through tune run --nproc_per_node)")
    ap.add_argument("--jobs", type=int, default=1, help="1-GPU points run at once, one per GPU")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per point")
    ap.add_argument("--out", default=None, help="JSON of every record (rewritten after each point)")
    ap.add_argument("--work", default=None, help="folder of the runs' output_dirs and logs (default: a temp dir)")
    ap.add_argument(
        "--expandable-segments", action="store_true", help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny models, 128-token rows (one rank: in process)")
    ap.add_argument("--in-process", action="store_true", help="run the recipe in this process (1 rank; --tiny)")
    ap.add_argument("--fit", action="store_true", help="find the limits on one GPU and fit the memory model")
    ap.add_argument("--fit-lengths", default="8192,16384,32768", help="rows probed first (batch 1)")
    ap.add_argument("--fit-granularity", type=int, default=4096, help="tokens to which the longest row is found")
    ap.add_argument("--fit-batch-len", type=int, default=32768, help="row length of the micro-batch search")
    ap.add_argument("--fit-probes", type=int, default=6, help="probes per search after the fixed lengths")
    ap.add_argument("--capacity-gib", type=float, default=None, help="the GPU's memory (default: as measured)")
    ap.add_argument("--fit-report", nargs="+", default=None, help="only fit the memory model to these JSON files")
    args = ap.parse_args(argv)
    args.models = _names(args.models, MODELS)
    args.variants = _names(args.variants, VARIANTS)
    args.ckpt, args.compile = _flags(args.ckpt), _flags(args.compile)
    args.fit_lengths = sorted(int(x) for x in args.fit_lengths.split(","))
    if args.tiny:
        args.in_process = args.nproc == 1  # several ranks: tune run's torchrun (gloo on the CPU)
        if args.seq_len == 32768:
            args.seq_len = 128
    if args.in_process and args.nproc > 1:
        raise SystemExit("--in-process runs one rank: drop --nproc (or --tiny / --in-process)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.fit_report:
        records = [r for f in args.fit_report for r in json.loads(Path(f).read_text())["records"]]
        report_fit(records, args)
        return 0
    runner = Runner(args)
    if args.fit:
        fit_limits(args, runner)
    else:
        grid(args, runner)
    failed = [r for r in runner.records if r.get("returncode") and not r.get("oom")]
    return 1 if failed and not args.fit else 0


if __name__ == "__main__":
    sys.exit(main())
