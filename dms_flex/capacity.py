"""python -m dms_flex.capacity: how many sequences fit, dense vs DMS, bf16 vs int8 KV.

KV bytes per token = layers x KV heads x 2 (K and V) x (head_dim x bytes + scale bytes); a DMS
cache at compression ratio CR holds ctx / CR slots per (row, KV head), times a headroom factor
for heads that keep more than the average (the cache's capacity is static).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

# name: (layers, q heads, KV heads, head dim, parameters)
PRESETS = {
    "llama3_8b": (32, 32, 8, 128, 8.03e9),
    "llama3_1_8b": (32, 32, 8, 128, 8.03e9),
    "llama3_2_1b": (16, 32, 8, 64, 1.24e9),
    "llama3_2_3b": (28, 24, 8, 128, 3.21e9),
    "qwen2_5_7b": (28, 28, 4, 128, 7.62e9),
    "qwen3_8b": (36, 32, 8, 128, 8.19e9),
    "smollm2_135m": (30, 9, 3, 64, 1.35e8),
}
WEIGHT_BYTES = {"none": 2.0, "int8": 1.0 + 1 / 64, "int4": 0.5 + 4 / 128}  # per parameter, scales included


@dataclass
class Plan:
    kv_bytes_per_token: float  # as stored, per token of context, all layers
    slots_per_head: int
    kv_bytes_per_sequence: float
    weight_bytes: float
    max_batch: int


def plan(
    preset: str,
    context: int,
    gpu_gib: float,
    cr: float = 1.0,
    kv: str = "bf16",
    weight_quant: str = "none",
    headroom: float = 1.1,
    reserve_gib: float = 2.0,
) -> Plan:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if kv not in ("bf16", "int8"):
        raise ValueError(f"kv={kv!r}: use bf16 or int8")
    if weight_quant not in WEIGHT_BYTES:
        raise ValueError(f"weight_quant={weight_quant!r}: use one of {', '.join(WEIGHT_BYTES)}")
    if not all(_finite(x) for x in (context, gpu_gib, cr, headroom, reserve_gib)):
        raise ValueError(
            f"context, gpu memory, CR and headroom must be finite numbers, got context {context}, "
            f"gpu memory {gpu_gib}, CR {cr}, headroom {headroom}, reserve {reserve_gib}"
        )
    if context < 1 or gpu_gib <= 0 or cr < 1 or headroom < 1:
        raise ValueError("context >= 1, gpu memory > 0, CR >= 1 and headroom >= 1 are required")
    layers, _, kv_heads, head_dim, params = PRESETS[preset]
    per_slot = 2 * (head_dim * (1 if kv == "int8" else 2) + (4 if kv == "int8" else 0))
    per_token = layers * kv_heads * per_slot
    slots = context if cr == 1 else min(context, math.ceil(context / cr * headroom))
    per_seq = layers * kv_heads * slots * per_slot
    weights = params * WEIGHT_BYTES[weight_quant]
    free = gpu_gib * 2**30 - weights - reserve_gib * 2**30
    return Plan(per_token, slots, per_seq, weights, max(0, int(free // per_seq)))


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except (TypeError, OverflowError):  # not a number, or an integer beyond any float
        return False


def _number(kind, low: float, strict: bool = False, what: str = ""):
    """An argparse type: a finite `kind` >= low (> low when strict); argparse turns the error into one line."""

    def parse(text: str):
        try:
            v = kind(text)
            float(v)  # an integer too large for a float is out of range below
        except OverflowError:
            v = math.inf
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: want a finite {what or 'number'} {'>' if strict else '>='} {low:g}"
            )
        return v

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dms_flex.capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama3_8b", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--context", type=_number(int, 1, what="token count"), default=32768)
    p.add_argument(
        "--gpu-mem",
        type=_number(float, 0, strict=True, what="GiB"),
        default=139.0,
        help="GiB of GPU memory (H200: ~139)",
    )
    p.add_argument("--cr", type=_number(float, 1, what="compression ratio"), nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--kv", choices=["bf16", "int8"], nargs="+", default=["bf16", "int8"])
    p.add_argument("--weight-quant", choices=list(WEIGHT_BYTES), default="none")
    p.add_argument(
        "--headroom",
        type=_number(float, 1, what="factor"),
        default=1.1,
        help="DMS capacity over the average kept length",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        base = plan(a.model, a.context, a.gpu_mem, 1, "bf16", a.weight_quant, a.headroom)
        print(
            f"{a.model}, context {a.context}, {a.gpu_mem:g} GiB, weights {base.weight_bytes / 2**30:.1f} GiB "
            f"({a.weight_quant}); dense bf16: {base.kv_bytes_per_token / 1024:.0f} KiB/token, "
            f"max batch {base.max_batch}"
        )
        print(f"{'cache':>14s} {'KiB/token':>10s} {'GiB/seq':>8s} {'max batch':>10s} {'x dense bf16':>12s}")
        for kv in a.kv:
            for cr in a.cr:
                r = plan(a.model, a.context, a.gpu_mem, cr, kv, a.weight_quant, a.headroom)
                name = f"{'dense' if cr == 1 else f'DMS {cr:g}x'} {kv}"
                gain = r.max_batch / base.max_batch if base.max_batch else float("inf")
                print(
                    f"{name:>14s} {r.kv_bytes_per_sequence / a.context / 1024:10.1f} "
                    f"{r.kv_bytes_per_sequence / 2**30:8.2f} {r.max_batch:10d} {gain:12.2f}"
                )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
