"""One evaluation run (`run`): load the model and the reference, build the data, evaluate vanilla, then each
DMS run (prepared just before it runs), then the baselines at DMS's achieved CR, writing results.json after
every method."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..generate import SamplingConfig
from . import baselines as bl
from . import data, metrics, report
from .methods import CheckpointLoader, Method, build_methods, prepare_dms
from .quantization import check_quantization, kv_label, load_reference, quantization_info, quantize_model

DEFAULT_REASONING_TASKS = ("basic_arithmetic",)
# small integer sums: the 135M default model scores well above chance on them
DEFAULT_TASK_KWARGS = {
    "basic_arithmetic": dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=1,
        operators=("+",),
        allow_negation=False,
        allow_parentheses=False,
    )
}


@dataclass
class Inputs:
    """What every method is evaluated on, and how its text is read."""

    tok: Any
    dtype: torch.dtype
    reference: nn.Module  # the KL/PPL reference (vanilla, unquantized, full-precision K/V)
    windows: torch.Tensor  # perplexity windows (N, --ppl-len); also the DMS CR measurement / calibration
    items: List[data.ReasoningItem]
    probes: Dict[str, List[data.ProbeItem]]
    stops: List[int]

    def encode(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render(self, item: data.ReasoningItem) -> List[int]:
        return metrics.render_reasoning(self.tok, item)


def run(args, loaded=None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The whole evaluation; `loaded` (a pretrained.DMSModel) skips loading --model."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    check_quantization(args, device, dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, folder = load_model(args, loaded, device, dtype, log)
    # the KL/PPL reference first (an unquantized copy must be taken before the weights are quantized)
    reference, ref_name = load_reference(args, base, folder, log)
    n_quantized = quantize_model(base.model, args.weight_quant, log, what="the model")
    dtype = next(base.model.parameters()).dtype  # int4 casts to bfloat16
    qinfo = quantization_info(args, dtype, reference, ref_name, n_quantized)
    log(f"setting: {report.format_setting(qinfo)}")
    results: Dict[str, Any] = {
        "model": str(folder or base.family),
        "device": str(device),
        "dtype": str(dtype),
        "settings": {k: v for k, v in vars(args).items()},
        "quantization": qinfo,
        "data": {},
        "runs": [],
        "skipped": {},
    }
    inputs = load_inputs(args, base, dtype, reference, results, log)
    path = out_dir / "results.json"
    results["runs"] = evaluate_all(args, base, inputs, results, path, log)
    if args.parallel_samples:
        results["parallel"] = report.parallel_rows(results["runs"])
    return report.write_final(path, results, log)


def load_model(args, loaded, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]):
    """--model (default: the embedded model with its packaged adapter) unless `loaded` is given; returns
    (the pretrained.DMSModel, its folder or None)."""
    from ..checkpoints import pretrained

    folder = args.model
    t0 = time.perf_counter()
    if loaded is None:
        adapter = getattr(args, "adapter", None)
        if folder is None:  # the embedded model, with its trained DMS adapter when one ships
            from ..checkpoints.embedded import default_model

            folder, adapter, _ = default_model(adapter, getattr(args, "no_adapter", False))
        overrides = {"window": args.dms_window} if args.dms_window is not None else None
        loaded = pretrained.load_dms_model(folder, dms_overrides=overrides, dtype=dtype, device=device, adapter=adapter)
        if adapter is not None:
            log(f"DMS adapter: {adapter}")
    base = loaded
    if base.tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer: the evaluation needs one")
    log(
        f"model: {folder or base.family} ({base.family}, {next(base.model.parameters()).dtype}, {device}), loaded in "
        f"{time.perf_counter() - t0:.1f}s; DMS settings {base.dms}"
        f"{'' if base.dms_trained else ' (not a DMS retrofit: untrained decisions)'}"
    )
    return base, folder


def load_inputs(
    args, base, dtype: torch.dtype, reference: nn.Module, results: Dict[str, Any], log: Callable[[str], None]
) -> Inputs:
    """The perplexity windows, reasoning items and retrieval probes (what was used or skipped goes into results)."""
    tok = base.tokenizer
    inputs = Inputs(
        tok=tok,
        dtype=dtype,
        reference=reference,
        windows=torch.empty(0),
        items=[],
        probes={},
        stops=[t for t in [tok.eos_token_id] if t is not None],
    )
    text_file = getattr(args, "text_file", None)
    texts = data.load_texts(args.texts, log=log) if args.texts or not text_file else {}
    if text_file:
        user = data.user_text(text_file)
        texts[user.name] = user
        log(f"data: {user.name}: {len(user.text) / 1e6:.2f} MB of text from {user.origin}")
    results["data"] = {s.name: s.origin for s in texts.values()}
    inputs.windows = torch.tensor(
        [w for s in texts.values() for w in data.windows_of(inputs.encode, s, args.ppl_windows, args.ppl_len)]
    )
    log(
        f"perplexity: {inputs.windows.shape[0]} windows of {args.ppl_len} tokens from {list(texts)}; the first "
        f"{args.ppl_prefix} of each are context only"
    )
    if "reasoning" in args.metrics or args.parallel_samples:
        why = data.reasoning_available()
        if why is None:
            kw = DEFAULT_TASK_KWARGS if args.easy_tasks else {}
            inputs.items = data.reasoning_items(
                args.reasoning_tasks.split(","), args.reasoning_n, task_kwargs=kw, shots=args.reasoning_shots
            )
        else:
            log(f"reasoning: skipped: {why}")
            results["skipped"]["reasoning"] = why
    haystack = (
        texts.get(args.haystack)
        if args.haystack
        else next((texts[n] for n in ("user", "austen", "kjv", "code") if n in texts), None)
    )
    if args.haystack and haystack is None:
        raise ValueError(f"--haystack {args.haystack} is not among the loaded texts {list(texts)}")
    for kind in ("needle", "vartrack"):
        if kind in args.metrics:
            inputs.probes[kind] = data.probe_items(
                kind,
                inputs.encode,
                inputs.decode,
                haystack.text,
                args.lengths,
                args.depths,
                args.trials,
                seed=args.seed,
                hops=args.hops,
            )
    check_context(base.model, args.ppl_len, [it for its in inputs.probes.values() for it in its])
    results["inputs"] = input_digests(inputs)
    if inputs.probes:
        log(
            f"long context: haystack {haystack.name}; lengths {args.lengths}, depths {args.depths}, "
            f"{args.trials} trial(s) each"
        )
    return inputs


def evaluate_all(
    args, base, inputs: Inputs, results: Dict[str, Any], path: Path, log: Callable[[str], None]
) -> List[Dict[str, Any]]:
    """vanilla, each DMS run, then the baselines, each metric at the CR DMS achieved on that metric's own
    inputs for the same request (from this run's DMS, or from --match-dms FILE; --no-match-dms-cr: at the
    requested CR); results.json is rewritten (partial) after each."""
    vanilla = Method("vanilla", base.model, kv_int8=args.kv == "int8", attention=args.attention)
    methods = build_methods(args, base)
    runs: List[Dict[str, Any]] = []

    def record(m: Method, match: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        runs.append(evaluate(m, args, inputs, log, match))
        report.write_partial(path, results, runs)
        return runs[-1]

    log("evaluating:")
    if "vanilla" in args.methods:
        record(vanilla)
    dms_cr: Dict[Optional[float], Dict[str, float]] = {}
    if getattr(args, "match_dms", None) and args.match_dms_cr:
        dms_cr = matched_crs(args.match_dms, results.get("inputs", {}))
        log(f"baselines: each metric at the CR DMS achieved on it in {args.match_dms}: {dms_cr}")
    checkpoints = CheckpointLoader(args, base.model, log)
    dms_methods = [m for m in methods if m.name == "dms"]
    for i, m in enumerate(dms_methods):
        prepare_dms(m, args, base, inputs.windows, log, checkpoints)  # CR measured on the perplexity windows
        dms_cr[m.requested_cr] = metric_crs(record(m))
        if m.checkpoint is not None:  # free a checkpoint once no later DMS run needs it
            m.model = None
            if all(o.checkpoint != m.checkpoint for o in dms_methods[i + 1 :]):
                checkpoints.release(m.checkpoint)
    for m in methods:
        if m.name in bl.POLICIES:
            match = dms_cr.get(m.requested_cr) if args.match_dms_cr else None
            if match:
                m.cr = match.get("ppl", m.cr)
                m.setting = f"each metric at DMS's achieved CR on its inputs for the request {m.requested_cr:g}"
            record(m, match)
    return runs


METRIC_NAMES = ("ppl", "reasoning", "needle", "vartrack")


def metric_crs(rec: Dict[str, Any]) -> Dict[str, float]:
    """A DMS run's token-weighted CR per metric (tokens seen / KV slots held, over every sequence, layer and KV
    head of that metric's inputs): the CR a baseline needs to hold the same KV bytes on the same inputs."""
    return {k: max(1.0, float(rec[k]["cr_slots"])) for k in METRIC_NAMES if isinstance(rec.get(k), dict)}


def input_digests(inputs: Inputs) -> Dict[str, str]:
    """A short hash of each metric's token ids: runs (or processes) compared cell by cell must share them."""
    import hashlib

    def h(seqs) -> str:
        d = hashlib.sha256()
        for s in seqs:
            d.update(bytes(str(list(s)), "ascii") + b";")
        return d.hexdigest()[:16]

    out = {"ppl": h(inputs.windows.tolist())}
    if inputs.items:
        out["reasoning"] = h(inputs.render(it) for it in inputs.items)
    for kind, its in inputs.probes.items():
        out[kind] = h(it.prompt for it in its)
    return out


def matched_crs(path: str, digests: Dict[str, str]) -> Dict[Optional[float], Dict[str, float]]:
    """{requested CR: {metric: CR}} of the DMS runs in an earlier results.json (--match-dms), refusing one
    measured on other inputs than this run's."""
    import json

    try:
        res = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--match-dms {path}: no such file (run the DMS process first: --methods dms --out DIR, then "
            f"--match-dms DIR/results.json)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--match-dms {path}: not a results.json ({e})") from None
    theirs = res.get("inputs") or {}
    missing = sorted(k for k in digests if k not in theirs)
    if missing:
        raise ValueError(
            f"--match-dms {path}: it records no DMS measurement on this run's {', '.join(missing)} inputs (an older "
            f"results.json, or a DMS process run with other --metrics); run the DMS process again with this "
            f"run's --metrics"
        )
    differ = sorted(k for k in set(theirs) & set(digests) if theirs[k] != digests[k])
    if differ:
        raise ValueError(
            f"--match-dms {path}: its DMS runs were measured on other {', '.join(differ)} inputs than this run's "
            f"(give both runs the same data, length, count and seed flags)"
        )
    out = {r.get("requested_cr"): metric_crs(r) for r in res.get("runs") or [] if r.get("method") == "dms"}
    if not out:
        raise ValueError(f"--match-dms {path}: it holds no DMS run")
    return out


def evaluate(
    m: Method, args, inputs: Inputs, log: Callable[[str], None], match: Optional[Dict[str, float]] = None
) -> Dict[str, Any]:
    """Every asked metric of one method: its record in results.json. `match` ({metric: CR}) sets a policy's
    CR metric by metric (a metric missing from it is an error)."""
    rec: Dict[str, Any] = {
        "method": m.name,
        "requested_cr": m.requested_cr,
        "cr": m.cr,
        "setting": m.setting,
        "kv": kv_label(m, inputs.dtype),
        "weights": args.weight_quant,
    }
    if match:
        rec["cr_by_metric"] = {}
    default_cr = m.cr

    def at(metric: str) -> None:
        if match:
            if metric not in match:  # never silently at another CR than DMS's on these inputs
                raise ValueError(
                    f"{m.name}: no DMS CR was measured on the {metric} inputs to match; evaluate DMS on the same "
                    f"--metrics first"
                )
            m.cr = match[metric]
            rec["cr_by_metric"][metric] = m.cr

    t = time.perf_counter()
    gen_kw = dict(max_new_tokens=args.reasoning_max_new, batch_size=args.batch_size, stop_tokens=inputs.stops)
    if "ppl" in args.metrics:
        at("ppl")
        rec["ppl"] = metrics.perplexity(
            m,
            inputs.windows,
            inputs.reference,
            prefix=args.ppl_prefix,
            batch_size=args.batch_size,
            cached=args.dms_cached,
        )
    if inputs.items and "reasoning" in args.metrics:
        at("reasoning")
        rec["reasoning"] = metrics.reasoning_accuracy(m, inputs.items, inputs.render, inputs.decode, **gen_kw)
    for kind, its in inputs.probes.items():
        at(kind)
        rec[kind] = metrics.probe_accuracy(m, its, inputs.decode, batch_size=args.batch_size, stop_tokens=inputs.stops)
    if (
        inputs.items
        and args.parallel_samples
        and (
            not m.compressed or m.requested_cr == args.parallel_samples or (m.name == "dms" and m.requested_cr is None)
        )
    ):
        at("reasoning")
        if m.compressed:
            rec["parallel"] = metrics.parallel_sampling(
                m,
                inputs.items,
                inputs.render,
                inputs.decode,
                args.parallel_samples,
                max_new_tokens=args.reasoning_max_new,
                sampling=SamplingConfig(args.temperature, top_p=args.top_p),
                seed=args.seed,
                stop_tokens=inputs.stops,
            )
        else:  # the 1-sample reference: vanilla's greedy answer (its KV bytes per question)
            r = rec.get("reasoning") or metrics.reasoning_accuracy(
                m, inputs.items, inputs.render, inputs.decode, **gen_kw
            )
            rec["parallel"] = {
                "samples_per_question": 1,
                "accuracy_vote": r["accuracy"],
                "accuracy_per_sample": r["accuracy"],
                "n": r["n"],
                "kv_live_bytes_per_question": r["kv_live_bytes"] / max(r["n"], 1),
                "cr": 1.0,
            }
    m.cr = default_cr
    rec["seconds"] = time.perf_counter() - t
    log(
        f"  {m.label:<18} done in {rec['seconds']:.1f}s"
        + (
            f"  ppl {rec['ppl']['ppl']:.3f} KL {rec['ppl']['kl']:.4f} (CR {rec['ppl']['cr']:.2f})"
            if "ppl" in rec
            else ""
        )
        + "".join(
            f"  {k} {rec[k]['accuracy']:.3f} (CR {rec[k]['cr_slots']:.2f})"
            for k in ("reasoning", "needle", "vartrack")
            if k in rec
        )
    )
    return rec


def check_context(model: nn.Module, ppl_len: int, probes: Sequence[data.ProbeItem]) -> None:
    """Refuse perplexity windows or probes (prompt + answer tokens) longer than the model's context
    (positions past it have no RoPE entry), with the longest values that fit."""
    ctx = getattr(model, "max_seq_len", None)
    if not ctx:
        return
    if ppl_len > ctx:
        raise ValueError(
            f"--ppl-len {ppl_len} is longer than the model's context ({ctx} tokens): use --ppl-len {ctx} or less"
        )
    over = sorted({it.length for it in probes if len(it.prompt) + it.max_new_tokens > ctx})
    if over:
        room = max(it.max_new_tokens for it in probes)
        raise ValueError(
            f"--lengths {','.join(map(str, over))}: a probe's prompt plus its answer ({room} tokens) must fit "
            f"the model's context of {ctx} tokens; use lengths up to {ctx - room}"
        )
