"""Long-context probes built from a haystack of text (`dms_flex.eval.data` supplies the text):

- needle in a haystack: "The secret number is 48213." at a depth (fraction of the context), then a
  question at the end; scored by the first number in the answer;
- variable tracking (RULER style): ``VAR ABCDE = 48213.`` followed by a chain of
  ``VAR FGHIJ = VAR ABCDE.`` assignments spread from the depth to the end; the model lists the
  variables holding the value; scored by recall of the chain's names.

Tokenizers are passed as two plain functions, ``encode(text) -> ids`` and ``decode(ids) -> text``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

Encode = Callable[[str], List[int]]
Decode = Callable[[Sequence[int]], str]


@dataclass
class ProbeItem:
    kind: str  # "needle" | "vartrack"
    prompt: List[int]
    answer: List[str]  # needle: [number]; vartrack: the chain's variable names
    length: int  # prompt tokens
    depth: float
    max_new_tokens: int
    info: Dict[str, object] = field(default_factory=dict)


NEEDLE_QUESTION = "\n\nQuestion: What is the secret number mentioned in the text above?\nAnswer: The secret number is"
VAR_QUESTION = (
    "\n\nQuestion: Which variables are assigned the value {value} in the text above? List them all.\n"
    "Answer: The variables assigned the value {value} are: VAR"
)
_SENTENCE_END = (".", "!", "?", "\n", ";")


def _haystack(encode: Encode, text: str, n_tokens: int, offset: int) -> List[int]:
    """n_tokens of the text from a place chosen by `offset` (wrapping to fit); a text too short for
    n_tokens raises ValueError saying how long it is."""
    ids: List[int] = []
    span = n_tokens * 6 + 64
    while len(ids) < n_tokens:
        if span >= 2 * len(text) + 64 and len(ids) < n_tokens:  # the whole text was read: it is too short
            ids = encode(text)
            if len(ids) >= n_tokens:
                break
            raise ValueError(
                f"the haystack text has {len(ids)} tokens, fewer than the {n_tokens} a probe needs: use shorter "
                f"--lengths or a longer text (--haystack / --text-file)"
            )
        start = offset % max(len(text) - span, 1)
        ids = encode(text[start : start + span])
        span *= 2
    return list(ids[:n_tokens])


def _snap_to_sentence(decode: Decode, ids: List[int], cut: int, reach: int = 48) -> int:
    """Move a cut back to just after a sentence end (within `reach` tokens), so inserts read naturally."""
    for c in range(cut, max(cut - reach, 0), -1):
        if decode(ids[c - 1 : c]).rstrip(" ").endswith(_SENTENCE_END):
            return c
    return cut


def _insert(decode: Decode, hay: List[int], inserts: Sequence[tuple]) -> List[int]:
    """inserts: (depth fraction, ids); inserted at sentence boundaries, in order."""
    cuts = [_snap_to_sentence(decode, hay, round(d * len(hay))) for d, _ in inserts]
    out, prev = [], 0
    for c, (_, ids) in sorted(zip(cuts, inserts), key=lambda t: t[0]):
        out += hay[prev:c] + list(ids)
        prev = c
    return out + hay[prev:]


def needle_item(
    encode: Encode,
    decode: Decode,
    haystack_text: str,
    length: int,
    depth: float,
    number: int,
    offset: int = 0,
    max_new_tokens: int = 8,
) -> ProbeItem:
    """A `length`-token prompt: haystack with the needle at `depth`, then the question."""
    needle = encode(f" The secret number is {number}. ")
    question = encode(NEEDLE_QUESTION)
    n_hay = length - len(needle) - len(question)
    if n_hay < 8:
        raise ValueError(f"length={length} leaves no room for a haystack")
    hay = _haystack(encode, haystack_text, n_hay, offset)
    prompt = _insert(decode, hay, [(depth, needle)]) + question
    return ProbeItem("needle", prompt, [str(number)], len(prompt), depth, max_new_tokens, {"number": number})


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def vartrack_item(
    encode: Encode,
    decode: Decode,
    haystack_text: str,
    length: int,
    depth: float,
    value: int,
    hops: int = 3,
    seed: int = 0,
    offset: int = 0,
    max_new_tokens: Optional[int] = None,
) -> ProbeItem:
    """First assignment at `depth`, the chain's other links spread evenly between it and the end."""
    rng = random.Random(seed)
    names: List[str] = []
    while len(names) < hops + 1:
        n = _var_name(rng)
        if n not in names:
            names.append(n)
    stmts = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
    ids = [encode(s) for s in stmts]
    question = encode(VAR_QUESTION.format(value=value))
    n_hay = length - sum(len(x) for x in ids) - len(question)
    if n_hay < 8:
        raise ValueError(f"length={length} leaves no room for a haystack")
    hay = _haystack(encode, haystack_text, n_hay, offset)
    depths = (
        [depth + (0.95 - depth) * i / max(hops, 1) for i in range(hops + 1)] if depth < 0.95 else [depth] * (hops + 1)
    )
    prompt = _insert(decode, hay, list(zip(depths, ids))) + question
    max_new = max_new_tokens or 6 * (hops + 1) + 4
    return ProbeItem("vartrack", prompt, names, len(prompt), depth, max_new, {"value": value, "hops": hops})


def probe_items(
    kind: str,
    encode: Encode,
    decode: Decode,
    haystack_text: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 1,
    seed: int = 0,
    hops: int = 3,
) -> List[ProbeItem]:
    """One item per (length, depth, trial), each with its own number and haystack place."""
    rng = random.Random(seed)
    items = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                number = rng.randrange(10_000, 100_000)
                offset = rng.randrange(0, 1 << 30)
                if kind == "needle":
                    items.append(needle_item(encode, decode, haystack_text, length, depth, number, offset))
                elif kind == "vartrack":
                    items.append(
                        vartrack_item(
                            encode,
                            decode,
                            haystack_text,
                            length,
                            depth,
                            number,
                            hops,
                            seed=rng.randrange(1 << 30),
                            offset=offset,
                        )
                    )
                else:
                    raise ValueError(f"unknown probe kind {kind!r}")
    return items


def score_needle(text: str, answer: Sequence[str]) -> float:
    """1 if the first number in the generated text is the needle's number."""
    m = re.search(r"\d[\d,]*", text)
    return float(m is not None and m.group(0).replace(",", "") == answer[0])


def score_vartrack(text: str, answer: Sequence[str]) -> float:
    """Recall of the chain's names in the generated text."""
    found = set(re.findall(r"[A-Z]{5}", text))
    return sum(n in found for n in answer) / len(answer)


def score_probe(item: ProbeItem, text: str) -> float:
    return score_needle(text, item.answer) if item.kind == "needle" else score_vartrack(text, item.answer)
