"""Per-layer cache capacities on real text: calibrate on some windows, check on others (CPU is enough).

Loads the embedded SmolLM2-135M-Instruct with its packaged adapter (or --checkpoint / --adapter), cuts
--calibration + --heldout windows of --prompt-len tokens from the KJV text (dms_flex.eval.data; or
--text-file), prefills the calibration windows into a full cache and applies layer_capacities' rule
(dms_flex/torchtune_model.py, capacities_from_state) for each --headroom, then prefills the held-out windows
and reports, per headroom, the allocation against a dense cache and the layers whose longest held-out head
needs more slots than the capacity (an overflow there). benchmarks/RESULTS.md section 24f.

    python3 benchmarks/layer_capacity_check.py --prompt-len 2048 --out capacity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dms_flex import torchtune_model as tm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--calibration", type=int, default=8, help="windows the capacities are sized on")
    p.add_argument("--heldout", type=int, default=8, help="other windows they are checked on")
    p.add_argument("--headroom", default="1.0,1.25,1.5,2.0,3.0", help="comma list")
    p.add_argument("--checkpoint", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the packaged one)")
    p.add_argument("--text-file", default=None, help="plain text to cut the windows from (default: KJV)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        args.headroom = [float(x) for x in args.headroom.split(",")]
    except ValueError:
        p.error(f"--headroom: comma-separated numbers >= 1, got {args.headroom!r}")
    if min(args.headroom) < 1 or args.prompt_len < 2 or args.calibration < 1 or args.heldout < 1:
        p.error("--headroom >= 1, --prompt-len >= 2, --calibration and --heldout >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dms_flex.checkpoints import default_model_dir, packaged_adapter, pretrained
    from dms_flex.eval.data import kjv_text, text_windows

    folder = Path(args.checkpoint) if args.checkpoint else default_model_dir()
    adapter = args.adapter or (None if args.checkpoint else packaged_adapter())
    T = args.prompt_len
    dm = pretrained.load_dms_model(folder, adapter=adapter, max_seq_len=T)
    model = dm.model.eval()
    text = Path(args.text_file).read_text() if args.text_file else kjv_text()
    if not text:
        print("error: no KJV text found (python -m dms_flex.eval.data --export DIR, or --text-file)", file=sys.stderr)
        return 2
    wins = text_windows(dm.tokenizer.encode, text, args.calibration + args.heldout, T)

    def state_of(rows):
        st = tm.InferenceState(model, len(rows), max_seq_len=T)
        with torch.no_grad():
            tm.prefill(model, torch.tensor(rows), st)
        return st

    t0 = time.time()
    cal, held = state_of(wins[: args.calibration]), state_of(wins[args.calibration :])
    need = [int(c.length.max()) for c in held.caches]  # per layer, the held-out windows' longest head
    res = {
        "prompt_len": T, "calibration_windows": args.calibration, "heldout_windows": args.heldout,
        "calibration_cr": cal.compression().ratio, "heldout_cr": held.compression().ratio,
        "heldout_need": need, "seconds": round(time.time() - t0, 1), "rows": [],
    }  # fmt: skip
    for h in args.headroom:
        caps = tm.capacities_from_state(cal, T, h)
        over = [layer for layer, (n, c) in enumerate(zip(need, caps)) if n > c]
        res["rows"].append(
            dict(
                headroom=h,
                fraction_of_dense=sum(caps) / (len(caps) * T),
                layers_over=over,
                worst_need_over_capacity=max(n / c for n, c in zip(need, caps)),
                caps=caps,
            )  # fmt: skip
        )
        r = res["rows"][-1]
        print(
            f"headroom {h}: {100 * r['fraction_of_dense']:.1f}% of dense; held-out overflow in layers {over or 'none'}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
