"""Checkpoint tools on the command line::

    python -m dms_flex.checkpoints export-adapter CHECKPOINT OUT [--base BASE]
    python -m dms_flex.checkpoints embedded     # convert the embedded SmolLM2 (if needed), print its folder

(``python -m dms_flex.pretrained export-adapter ...`` still runs the first.)
"""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, export_adapter
from .lora import LORA_WEIGHTS_NAME


def main(argv=None, prog: str = "python -m dms_flex.checkpoints") -> int:
    p = argparse.ArgumentParser(prog=prog, description="DMS checkpoint tools.")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export-adapter",
        help="write the DMS adapter of an adapter-only retrofit as a small folder",
        description="Write CHECKPOINT's DMS adapter (dms.decision=adapter, train_adapter_only=true "
        "retrofit) into OUT as dms_adapter.safetensors + dms_config.json; apply it with "
        "`python -m dms_flex.generate --checkpoint BASE --adapter OUT`.",
    )
    ex.add_argument("checkpoint", help="the retrofit's Hugging Face-format folder (e.g. dms_runs/NAME/final)")
    ex.add_argument("out", help="the adapter folder to write (replaced if it is an adapter folder already)")
    ex.add_argument(
        "--base",
        help="the base model folder the retrofit started from: refuse unless the checkpoint's "
        "base weights equal it (recommended)",
    )
    sub.add_parser("embedded", help="convert the embedded SmolLM2-135M-Instruct (once) and print its folder")
    args = p.parse_args(argv)
    if args.command == "embedded":
        from .embedded import default_model_dir

        print(default_model_dir())
        return 0
    try:
        out = export_adapter(args.checkpoint, args.out, base_folder=args.base)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    size = (out / ADAPTER_WEIGHTS_NAME).stat().st_size
    lora = out / LORA_WEIGHTS_NAME
    print(
        f"wrote {out}: {ADAPTER_WEIGHTS_NAME} ({size / 1024:.1f} KiB), {ADAPTER_CONFIG_NAME} "
        f"(trained CR {cfg.get('dms_cr', '?')}, window {cfg.get('dms_window_size')})"
        + (f", {LORA_WEIGHTS_NAME} ({lora.stat().st_size / 2**20:.2f} MiB)" if lora.is_file() else "")
    )
    if args.base is None:
        print(
            "note: base weights not checked; pass --base BASE to make sure the adapter alone reproduces the "
            "checkpoint (it does only when the retrofit froze the base: train_adapter_only=true)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
