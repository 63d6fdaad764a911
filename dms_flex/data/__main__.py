"""``python -m dms_flex.data reasoning --checkpoint DIR``: build the teacher-answered reasoning set
(a cached chat jsonl, see dms_flex.data.reasoning) ahead of a run."""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Optional

from .reasoning import DEFAULT_TASKS, build_reasoning_set
from .tokenizers import SMOLLM2


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dms_flex.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reasoning", help="build the teacher-answered reasoning set (cached jsonl)")
    r.add_argument("--checkpoint", default=SMOLLM2, help="teacher folder (default: the embedded SmolLM2)")
    r.add_argument("--out", help="jsonl path (default: under $DMS_FLEX_HOME/reasoning/)")
    r.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    r.add_argument("--num-problems", type=int, default=2000)
    r.add_argument("--problems-per-conversation", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-new-tokens", type=int, default=512)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument(
        "--adopt",
        metavar="JSONL",
        help="install a set built elsewhere (another machine) by the same teacher and settings instead of building",
    )
    args = p.parse_args(None if argv is None else list(argv))
    try:
        out = build_reasoning_set(
            args.checkpoint,
            path=args.out,
            tasks=args.tasks,
            num_problems=args.num_problems,
            problems_per_conversation=args.problems_per_conversation,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            adopt=args.adopt,
        )
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
