"""Our CPU decode step against transformers' decode forward, alternated step by step (a steadier A/B than
bench_cpu_generate.py's whole runs when other processes share the machine: both sides see the same load).

The README's main job (embedded SmolLM2-135M-Instruct, packaged adapter, float32, the CLI's prompt), one
thread; per repeat a fresh prefill of both, then 128 steps alternating `torchtune_model.decode_step` and
`LlamaForCausalLM.forward` on a DynamicCache (no `generate` loop around it: conservative for us), each timed
by the thread's CPU time. Prints the median step of each and their ratio per repeat (the first is warm-up).

    python3 benchmarks/bench_cpu_step_lockstep.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import DynamicCache, LlamaForCausalLM

    from dms_flex import fusion
    from dms_flex import generate as cli
    from dms_flex import torchtune_model as tm
    from dms_flex.checkpoints.embedded import default_model_dir

    cli_args = cli.parse_args(["--device", "cpu", "--dtype", "float32", "--max-seq-len", "4096"])
    dm, _, _ = cli._load(cli_args, torch.device("cpu"), torch.float32)
    fusion.fuse_projections(dm.model)
    ids = cli._prompt_ids(cli_args, dm.tokenizer)
    hf = LlamaForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    ours_ms, hf_ms, ratios = [], [], []
    for r in range(args.repeats + 1):
        state = tm.InferenceState(dm.model, 1, max_seq_len=4096, dtype=torch.float32)
        cache = DynamicCache(config=hf.config)
        with torch.inference_mode():
            lo = tm.prefill(dm.model, torch.tensor([ids]), state)
        with torch.no_grad():
            lh = hf(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[:, -1]
        pos, o, h = len(ids), [], []
        to, th = lo.argmax(-1, keepdim=True), lh.argmax(-1, keepdim=True)
        for _ in range(args.steps):
            with torch.inference_mode():
                t0 = time.thread_time()
                lo = tm.decode_step(dm.model, to, state)
                o.append(time.thread_time() - t0)
            with torch.no_grad():
                t0 = time.thread_time()
                out = hf(
                    th, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]), logits_to_keep=1
                )
                h.append(time.thread_time() - t0)
            lh = out.logits[:, -1]
            pos += 1
            to, th = lo.argmax(-1, keepdim=True), lh.argmax(-1, keepdim=True)
        if r == 0:
            continue  # warm-up
        mo, mh = statistics.median(o) * 1e3, statistics.median(h) * 1e3
        ours_ms.append(mo)
        hf_ms.append(mh)
        ratios.append(mh / mo)
        print(f"repeat {r}: ours {mo:.1f} ms/step, transformers forward {mh:.1f} ms/step, speed ratio {mh / mo:.3f}")
    print(f"median speed ratio ours / transformers forward: {statistics.median(ratios):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ours_ms": ours_ms, "hf_forward_ms": hf_ms, "ratio": ratios, "torch": torch.__version__}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
