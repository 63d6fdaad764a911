"""The README's main job on the CPU against transformers' `generate` on the same weights.

Loads the embedded SmolLM2-135M-Instruct the way `python -m dms_flex.generate` does (packaged DMS
adapter, float32), and transformers' LlamaForCausalLM from the same converted folder; both get the
same chat-templated prompt and decode exactly --new-tokens greedy tokens (EOS ignored). Runs are
interleaved (ours, transformers, ours, ...) in one process, so that a noisy machine affects both alike;
the ratio ours / transformers is reported per repeat and as a median.

Decode tok/s is measured identically for both: (tokens - 1) / (time of the last token - time of the
first token), the first token being the prefill's; timestamps come from the streaming callbacks.
The same span is also measured in CPU time of the generating thread ("cpu" ratios): with
--threads 1 that is the decode's own cost whatever else shares the cores, the steadier measure on
a busy machine (with more threads it leaves out the other threads' share of each GEMM).

    python3 benchmarks/bench_cpu_generate.py                   # DMS (the demo's default) and dense
    python3 benchmarks/bench_cpu_generate.py --repeats 5 --out results/cpu_generate.json
    python3 benchmarks/bench_cpu_generate.py --modes dms --compile   # our decode step torch.compile'd
    python3 benchmarks/bench_cpu_generate.py --threads 1 --repeats 5  # CPU-time ratios on a busy machine
    python3 benchmarks/bench_cpu_generate.py --modes dms,dense,hf-colmajor  # + transformers on column-major weights
    python3 benchmarks/bench_cpu_generate.py --modes dms,dms-hf  # + DMS inside transformers' generate (dms_flex.hf)
    python3 benchmarks/bench_cpu_generate.py --prompt-tokens 2048 --new-tokens 16  # a long prefill (prose)

Our loop stores its float32 projection weights column-major (`dms_flex.fusion.fuse_projections`, as the CLI
does); `hf-colmajor` is transformers' `generate` with its Linear and Embedding weights laid out the same way
(`fusion.inference_layout`), an ablation that separates the layout's share of the ratio from the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chat", default=None, help="user message (default: the CLI's default chat)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="instead of the chat: the first N tokens of English prose (dms_flex.eval.data's KJV, else the "
        "held-out Python sources), to time a long prefill (time to first token, both systems)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--modes",
        default="dms,dense",
        help="comma list of dms, dense (ours), hf-colmajor (transformers on column-major weights) and dms-hf "
        "(dms_flex.hf: DMS in transformers' generate, growable DMSCache) to compare",
    )
    p.add_argument("--compile", action="store_true", help="our decode step through torch.compile (as --compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="keep q/k/v and gate/up as separate GEMMs and torch's row-major weights (ablation)",
    )
    p.add_argument(
        "--check-tokens",
        action="store_true",
        help="also report whether our greedy tokens equal transformers' (informative only)",
    )
    p.add_argument(
        "--hf-inference-mode", action="store_true", help="run transformers' generate under torch.inference_mode"
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.prompt_tokens is not None and not 1 <= args.prompt_tokens <= args.max_seq_len - args.new_tokens:
        p.error(
            f"--prompt-tokens must be in [1, --max-seq-len - --new-tokens] = [1, {args.max_seq_len - args.new_tokens}]"
            f", got {args.prompt_tokens}"
        )
    known = ("dms", "dense", "hf-colmajor", "dms-hf")
    unknown = [m for m in args.modes.split(",") if m.strip() and m.strip() not in known]
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {', '.join(known)}")
    return args


class _Clock:
    """Timestamps of every generated token: wall clock, and the CPU time of the generating thread."""

    def __init__(self):
        self.times = []
        self.cpu = []

    def tick(self, *_):
        self.times.append(time.perf_counter())
        self.cpu.append(time.thread_time())

    def decode_tps(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def cpu_tps(self) -> float:
        """Tokens per second of the generating thread's CPU time: with --threads 1, what the decode
        costs regardless of how many other processes share the cores (a noisy machine's measure)."""
        return (len(self.cpu) - 1) / (self.cpu[-1] - self.cpu[0])

    def median_step_tps(self) -> float:
        """1 / the median time between tokens: less sensitive to bursts of load from other processes."""
        return 1.0 / statistics.median(b - a for a, b in zip(self.times, self.times[1:]))


def run_ours(dm, ids, n, eviction, max_seq_len, step_fn=None):
    from dms_flex import torchtune_model as tm
    from dms_flex.generate import SamplingConfig, generate_tokens

    state = tm.InferenceState(dm.model, 1, max_seq_len=max_seq_len, eviction=eviction, dtype=torch.float32)
    clock = _Clock()
    t0 = time.perf_counter()
    res = generate_tokens(
        dm.model,
        [ids],
        state,
        max_new_tokens=n,
        sampling=SamplingConfig(),
        stop_tokens=(),
        step_fn=step_fn,
        on_token=clock.tick,
    )
    wall = time.perf_counter() - t0
    assert len(res.tokens[0]) == n, len(res.tokens[0])
    return {
        "decode_tok_s": clock.decode_tps(),
        "median_step_tok_s": clock.median_step_tps(),
        "cpu_tok_s": clock.cpu_tps(),
        "wall_s": wall,
        "prefill_s": res.prefill_seconds,
        "ttft_s": clock.times[0] - t0,
        "loop_decode_tok_s": res.decode_tokens_per_s,
    }, res.tokens[0]


def run_hf(model, ids, n, inference_mode=False):
    """transformers' generate; a DMS model (dms_flex.hf) gets a fresh growable DMSCache, as its README shows."""
    from transformers.generation.streamers import BaseStreamer

    import dms_flex.hf as dms_hf

    extra = {}
    if getattr(model, "_dms_flex_bench_dms", False):
        cache = dms_hf.DMSCache(model)
        extra["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache

    clock = _Clock()

    class Streamer(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            clock.tick()

        def end(self):
            pass

    x = torch.tensor([ids])
    t0 = time.perf_counter()
    # transformers' generate as a user calls it (it runs under torch.no_grad); --hf-inference-mode wraps it
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            streamer=Streamer(),
            pad_token_id=0,
            **extra,
        )
    wall = time.perf_counter() - t0
    new = out[0, len(ids) :].tolist()
    assert len(new) == n, len(new)
    return {
        "decode_tok_s": clock.decode_tps(),
        "median_step_tok_s": clock.median_step_tps(),
        "cpu_tok_s": clock.cpu_tps(),
        "wall_s": wall,
        "ttft_s": clock.times[0] - t0,
    }, new


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    from dms_flex import fusion
    from dms_flex import generate as cli
    from dms_flex import torchtune_model as tm
    from dms_flex.checkpoints.embedded import default_model_dir

    # the CLI's own loading and prompt helpers: the embedded model with its packaged adapter, float32, CPU
    cli_args = cli.parse_args(
        ["--device", "cpu", "--dtype", "float32", "--max-seq-len", str(args.max_seq_len)]
        + (["--chat", args.chat] if args.chat else [])
    )
    dm, _, _ = cli._load(cli_args, torch.device("cpu"), torch.float32)
    if args.fuse:  # as the CLI does: one GEMM for q/k/v and one for gate/up
        fusion.fuse_projections(dm.model)
    ids = cli._prompt_ids(cli_args, dm.tokenizer)
    if args.prompt_tokens:
        from dms_flex.eval import data as eval_data

        texts = eval_data.load_texts(["kjv", "code"], log=lambda _: None)
        src = texts.get("kjv") or texts["code"]
        ids = dm.tokenizer.encode(src.text[: 8 * args.prompt_tokens], add_bos=True, add_eos=False)[: args.prompt_tokens]
        if len(ids) < args.prompt_tokens:
            raise SystemExit(f"--prompt-tokens {args.prompt_tokens}: the text gives only {len(ids)} tokens")
        print(f"prompt: the first {len(ids)} tokens of {src.name} ({src.origin})", file=sys.stderr)
    hf = LlamaForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly n tokens, like ours with stop_tokens=()
    n = args.new_tokens
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    hf_cm = None
    if "hf-colmajor" in modes:  # the ablation: transformers' model with our CPU weight layout
        hf_cm = LlamaForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
        hf_cm.generation_config.eos_token_id = None
        tied = hf_cm.lm_head.weight is hf_cm.model.embed_tokens.weight
        for mod in list(hf_cm.modules()):
            if not (tied and mod is hf_cm.lm_head):  # a tied head is re-tied to the laid-out table below
                fusion.inference_layout(mod)
        if tied:
            hf_cm.lm_head.weight = hf_cm.model.embed_tokens.weight
    hf_dms = None
    if "dms-hf" in modes:  # DMS inside transformers' generate: dms_flex.hf, loaded as its README shows
        import dms_flex.hf as dms_hf
        from dms_flex.checkpoints.embedded import packaged_adapter

        hf_dms = dms_hf.from_pretrained(default_model_dir(), adapter=packaged_adapter(), dtype=torch.float32)
        hf_dms.generation_config.eos_token_id = None
        hf_dms._dms_flex_bench_dms = True
    hf_models = {"transformers": hf, "hf-colmajor": hf_cm, "dms-hf": hf_dms}
    step_fn = None
    compile_s = None
    if args.compile:
        step_fn = torch.compile(tm.decode_step, fullgraph=True)
    print(
        f"prompt {len(ids)} tokens, {n} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"modes {modes}{', compiled' if args.compile else ''}{'' if args.fuse else ', unfused'}",
        file=sys.stderr,
    )

    # warm-up (first-call allocations; the compile of --compile, timed)
    for m in modes:
        t0 = time.perf_counter()
        if m in hf_models:
            run_hf(hf_models[m], ids, min(n, 8), args.hf_inference_mode)
            continue
        run_ours(dm, ids, min(n, 8), m == "dms", args.max_seq_len, step_fn)
        if args.compile and compile_s is None:
            compile_s = time.perf_counter() - t0
    run_hf(hf, ids, min(n, 8), args.hf_inference_mode)

    rows = {m: [] for m in modes}
    rows["transformers"] = []
    tokens = {}
    for r in range(args.repeats):
        order = modes + ["transformers"] if r % 2 == 0 else ["transformers"] + modes  # drift hits both alike
        for m in order:
            if m in hf_models:
                res, toks = run_hf(hf_models[m], ids, n, args.hf_inference_mode)
            else:
                res, toks = run_ours(dm, ids, n, m == "dms", args.max_seq_len, step_fn)
            rows[m].append(res)
            tokens[m] = toks
        res = rows["transformers"][-1]
        line = "  ".join(f"{k} {v[-1]['decode_tok_s']:.1f}" for k, v in rows.items())
        ratios = "  ".join(
            f"{m}/hf {rows[m][-1]['decode_tok_s'] / res['decode_tok_s']:.2f} "
            f"(cpu {rows[m][-1]['cpu_tok_s'] / res['cpu_tok_s']:.2f})"
            for m in modes
        )
        print(f"repeat {r}: decode tok/s  {line}   ratio  {ratios}", flush=True)

    summary = {}
    for k, v in rows.items():
        summary[k] = {
            "decode_tok_s_median": statistics.median(x["decode_tok_s"] for x in v),
            "median_step_tok_s_median": statistics.median(x["median_step_tok_s"] for x in v),
            "cpu_tok_s_median": statistics.median(x["cpu_tok_s"] for x in v),
            "wall_s_median": statistics.median(x["wall_s"] for x in v),
            "ttft_s_median": statistics.median(x["ttft_s"] for x in v),
        }
    for m in modes:
        for key, name in (
            ("decode_tok_s", "ratio_vs_transformers"),
            ("median_step_tok_s", "step_ratio_vs_transformers"),
            ("cpu_tok_s", "cpu_ratio_vs_transformers"),
        ):
            per = [a[key] / b[key] for a, b in zip(rows[m], rows["transformers"])]
            summary[m][f"{name}_per_repeat"] = per
            summary[m][f"{name}_median"] = statistics.median(per)
    for m in modes:  # time to first token (the prefill): transformers' over ours, per repeat
        per = [b["ttft_s"] / a["ttft_s"] for a, b in zip(rows[m], rows["transformers"])]
        summary[m]["prefill_ratio_vs_transformers_per_repeat"] = per
        summary[m]["prefill_ratio_vs_transformers_median"] = statistics.median(per)
    print("median decode tok/s: " + "  ".join(f"{k} {v['decode_tok_s_median']:.1f}" for k, v in summary.items()))
    print(
        f"time to first token ({len(ids)}-token prompt), median s: "
        + "  ".join(f"{k} {v['ttft_s_median']:.2f}" for k, v in summary.items())
        + "   prefill speed vs transformers: "
        + "  ".join(f"{m} {summary[m]['prefill_ratio_vs_transformers_median']:.2f}x" for m in modes)
    )
    print(
        "median ratio vs transformers (decode tok/s; in brackets: from the median time per token, from the "
        "generating thread's CPU time): "
        + "  ".join(
            f"{m} {summary[m]['ratio_vs_transformers_median']:.2f}x ({summary[m]['step_ratio_vs_transformers_median']:.2f}x, "
            f"cpu {summary[m]['cpu_ratio_vs_transformers_median']:.2f}x)"
            for m in modes
        )
    )
    if compile_s is not None:
        print(f"first compiled call (compile included): {compile_s:.1f}s")
    if args.check_tokens:
        for m in modes:
            same = tokens[m] == tokens["transformers"]
            print(f"{m} tokens == transformers tokens: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "prompt_tokens": len(ids),
                    "new_tokens": n,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "compile": args.compile,
                    "fuse": args.fuse,
                    "compile_s": compile_s,
                    "summary": summary,
                    "runs": rows,
                    "tokens": tokens,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
