"""Offline evaluation data: text for perplexity and haystacks, long-context probes, reasoning-gym.

Text sources (found if installed, else skipped with a message; Python's own sources always exist):
- ``kjv``: the King James Bible from Debian's ``bible-kjv`` (the ``bible`` program prints it).
  Install: ``apt-get install bible-kjv``.
- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (an R lazy-load data
  base, read with the PyPI package ``rdata``; R itself is not needed). Install without R:
  ``python -m dms_flex.eval.data --fetch-austen`` (``apt-get download`` + ``dpkg -x`` into
  ``$DMS_FLEX_HOME/data``), or ``apt-get install r-cran-janeaustenr``; plus ``pip install rdata``.
- ``code``: Python standard-library sources, from modules the retrofit data
  (``dms_flex.data.DEFAULT_PY_MODULES``) does not use, so they stay held out.
On a machine without the Debian packages (a GPU box without network), plain-text copies work:
``python -m dms_flex.eval.data --export DIR`` writes ``DIR/kjv.txt`` and ``DIR/austen.txt`` where the
packages are installed; set ``DMS_FLEX_TEXT_DIR=DIR`` where they are not (default
``$DMS_FLEX_HOME/data``).

Long-context probes are built from a haystack of that text:
- needle in a haystack: "The secret number is 48213." at a depth (fraction of the context), then a
  question at the end; scored by the first number in the answer;
- variable tracking (RULER style): ``VAR ABCDE = 48213.`` followed by a chain of
  ``VAR FGHIJ = VAR ABCDE.`` assignments spread from the depth to the end; the model lists the
  variables holding the value; scored by recall of the chain's names.

Tokenizers are passed as two plain functions, ``encode(text) -> ids`` and ``decode(ids) -> text``.

``python -m dms_flex.eval.data`` prints which sources are found.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

Encode = Callable[[str], List[int]]
Decode = Callable[[Sequence[int]], str]

TEXT_SOURCES = ("kjv", "austen", "code")
# standard-library files not in the retrofit's DEFAULT_PY_MODULES (held out from training)
HELD_OUT_PY_FILES = (
    "inspect.py",
    "typing.py",
    "subprocess.py",
    "ast.py",
    "random.py",
    "datetime.py",
    "tarfile.py",
    "zipfile/__init__.py",
    "logging/__init__.py",
    "collections/__init__.py",
    "threading.py",
    "shutil.py",
    "tempfile.py",
    "weakref.py",
    "gettext.py",
    "locale.py",
)
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


@dataclass
class TextSource:
    name: str
    text: str
    origin: str  # where it came from, printed with the results


# ============================================================================ text sources
def text_dir() -> Path:
    """Where plain-text copies of the sources are looked for (and exported to by default)."""
    from ..checkpoints.paths import dms_flex_home

    return Path(os.environ.get("DMS_FLEX_TEXT_DIR") or dms_flex_home() / "data")


def _text_copy(name: str) -> Optional[str]:
    p = text_dir() / f"{name}.txt"
    return p.read_text(encoding="utf-8") if p.is_file() else None


def kjv_text() -> Optional[str]:
    """The whole King James Bible via Debian's `bible` program (bible-kjv), or None."""
    exe = shutil.which("bible")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or len(out.stdout) < 100_000:
        return None
    # "Ge1:1 In the beginning ..." -> the verse text only: references would be easy, meaningless tokens
    return "\n".join(re.sub(r"^\S+\s+", "", line) for line in out.stdout.splitlines() if line.strip())


def austen_dirs() -> List[Path]:
    """Where the janeaustenr R package may live (first existing wins)."""
    from ..checkpoints.paths import dms_flex_home

    cands = []
    if os.environ.get("DMS_FLEX_AUSTEN_DIR"):
        cands.append(Path(os.environ["DMS_FLEX_AUSTEN_DIR"]))
    sub = Path("usr/lib/R/site-library/janeaustenr")
    cands += [
        Path("/") / sub,
        Path("/usr/local/lib/R/site-library/janeaustenr"),
        dms_flex_home() / "data" / AUSTEN_DEB / sub,
    ]
    return cands


def austen_text() -> Optional[str]:
    """Austen's six novels from janeaustenr's R data base (Rdata.rdx index + Rdata.rdb blobs), or None
    when the package or the reader (`rdata`) is missing."""
    folder = next((d for d in austen_dirs() if (d / "data" / "Rdata.rdx").is_file()), None)
    if folder is None or importlib.util.find_spec("rdata") is None:
        return None
    import warnings

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialization has no file header
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((folder / "data" / "Rdata.rdx").read_bytes()))
    blobs = (folder / "data" / "Rdata.rdb").read_bytes()
    variables = {str(k): v for k, v in index["variables"].items()}
    books = []
    for name in AUSTEN_NOVELS:
        if name not in variables:
            continue
        off, n = (int(x) for x in variables[name])
        # each object: 4-byte big-endian length, then zlib-compressed R serialization
        lines = parse(zlib.decompress(blobs[off + 4 : off + n]))
        books.append("\n".join(str(x) for x in lines))
    return "\n\n".join(books) if books else None


def fetch_austen(dest: Optional[Path] = None) -> Path:
    """Download the Debian package and unpack it without installing R: apt-get download + dpkg -x."""
    from ..checkpoints.paths import dms_flex_home

    dest = Path(dest or dms_flex_home() / "data" / AUSTEN_DEB)
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("fetching janeaustenr needs apt-get and dpkg (a Debian/Ubuntu machine)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("*.deb"))
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
    return dest


def python_code_text(files: Sequence[str] = HELD_OUT_PY_FILES) -> str:
    """Standard-library sources, concatenated with a header line per file (always available)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in files:
        p = root / rel
        if p.is_file():
            parts.append(f"# ---- {rel}\n" + p.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise FileNotFoundError(f"no Python standard-library sources under {root}")
    return "\n\n".join(parts)


def load_texts(names: Sequence[str] = TEXT_SOURCES, log: Callable[[str], None] = print) -> Dict[str, TextSource]:
    """The requested sources that exist here; the Python sources stand in when none is found."""
    unknown = set(names) - set(TEXT_SOURCES)
    if unknown:
        raise ValueError(f"unknown text source(s) {sorted(unknown)}; known: {TEXT_SOURCES}")
    found: Dict[str, TextSource] = {}
    for name in names:
        if name in ("kjv", "austen"):
            text, origin = (
                (kjv_text(), "Debian bible-kjv (`bible -f Gen1:1-Rev22:21`)")
                if name == "kjv"
                else (austen_text(), "Debian r-cran-janeaustenr (six novels, read with rdata)")
            )
            if text is None:
                text, origin = _text_copy(name), f"plain-text copy {text_dir() / (name + '.txt')}"
            if text is None:
                how = (
                    "apt-get install bible-kjv"
                    if name == "kjv"
                    else "python -m dms_flex.eval.data --fetch-austen; pip install rdata"
                )
                log(f"data: {name} not found ({how}; or a copy at {text_dir() / (name + '.txt')}); skipped")
                continue
            found[name] = TextSource(name, text, origin)
        else:
            found[name] = TextSource(
                name,
                python_code_text(),
                f"Python {sys.version.split()[0]} standard library ({len(HELD_OUT_PY_FILES)} held-out files)",
            )
    if not found:
        log("data: none of the requested sources found: falling back to the Python standard-library sources")
        found["code"] = TextSource("code", python_code_text(), "Python standard library (fallback)")
    for s in found.values():
        log(f"data: {s.name}: {len(s.text) / 1e6:.2f} MB of text from {s.origin}")
    return found


def text_windows(encode: Encode, text: str, n: int, length: int, chars_per_token: float = 6.0) -> List[List[int]]:
    """n windows of exactly `length` tokens, starting at evenly spaced places of the text (each
    window is one tokenization of a slice, so no window straddles a cut-up token)."""
    span = int(length * chars_per_token) + 64
    if len(text) < span:
        raise ValueError(f"text of {len(text)} characters is too short for {length}-token windows")
    starts = [int(i * (len(text) - span) / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
    out = []
    for s in starts:
        # start at a line boundary so the window begins with a whole word
        nl = text.find("\n", s)
        s = nl + 1 if 0 <= nl < s + 200 else s
        chunk_len = span
        while True:
            ids = encode(text[s : s + chunk_len])
            if len(ids) > length or s + chunk_len >= len(text):
                break
            chunk_len *= 2
        if len(ids) < length:
            raise ValueError(f"could not get {length} tokens from the text at offset {s}")
        out.append(list(ids[:length]))
    return out


# ============================================================================ long-context probes
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
    ids: List[int] = []
    span = n_tokens * 6 + 64
    while len(ids) < n_tokens:
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


# ============================================================================ reasoning-gym
REASONING_GYM_HINT = "pip install reasoning-gym==0.1.25"
REASONING_INSTRUCTION = "Give only the final answer, with no explanation."
# held out from the retrofit's reasoning set (dms_flex.data builds it with seed 0)
REASONING_SEED = 1234


@dataclass
class ReasoningItem:
    task: str
    question: str
    entry: dict
    dataset: object  # the reasoning-gym dataset that scores it
    shots: List[tuple] = field(default_factory=list)  # (question, answer) worked examples shown first

    def score(self, answer: Optional[str]) -> float:
        return float(self.dataset.score_answer(answer=answer, entry=self.entry))


def reasoning_available() -> Optional[str]:
    """None if reasoning-gym imports, else why not."""
    if importlib.util.find_spec("reasoning_gym") is None:
        return f"reasoning-gym is not installed ({REASONING_GYM_HINT})"
    try:
        import reasoning_gym  # noqa: F401
    except Exception as e:  # a broken install: say so and skip
        return f"reasoning-gym does not import: {type(e).__name__}: {e}"
    return None


def reasoning_items(
    tasks: Sequence[str],
    per_task: int,
    seed: int = REASONING_SEED,
    task_kwargs: Optional[Dict[str, dict]] = None,
    shots: int = 0,
) -> List[ReasoningItem]:
    """per_task problems of each task; `shots` solved examples per task (drawn with another seed)
    go before each question: a small model follows the answer format from examples, not from rules."""
    import reasoning_gym

    unknown = sorted(set(tasks) - set(reasoning_gym.factory.DATASETS))
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {unknown}")
    items = []
    for task in tasks:
        kw = (task_kwargs or {}).get(task, {})
        ds = reasoning_gym.create_dataset(task, size=per_task, seed=seed, **kw)
        examples = []
        if shots:
            ex = reasoning_gym.create_dataset(task, size=shots, seed=seed + 1, **kw)
            examples = [(e["question"], str(e["answer"])) for e in ex]
        items += [ReasoningItem(task, e["question"], e, ds, examples) for e in ds]
    return items


def extract_answer(text: str) -> str:
    """The answer in <answer> tags if any (reasoning-gym's convention), else the first non-empty line
    without a leading 'Answer:' and a trailing period."""
    m = re.findall(r"<answer>\s?(.*?)\s?</answer>", text, flags=re.DOTALL)
    if m:
        return m[-1].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(the )?(final )?answer( is)?\s*[:=]?\s*", "", line, flags=re.IGNORECASE)
    return line.rstrip(".").strip()


# ============================================================================ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dms_flex.eval.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--fetch-austen",
        action="store_true",
        help=f"apt-get download {AUSTEN_DEB} and unpack it under $DMS_FLEX_HOME/data (no R needed)",
    )
    p.add_argument(
        "--export",
        metavar="DIR",
        help="write the kjv and austen texts found here as DIR/<name>.txt (for machines without the Debian packages)",
    )
    args = p.parse_args(argv)
    if args.fetch_austen:
        print(f"unpacked into {fetch_austen()}")
    texts = load_texts()
    if args.export:
        out = Path(args.export)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("kjv", "austen"):
            if name in texts:
                (out / f"{name}.txt").write_text(texts[name].text, encoding="utf-8")
                print(f"wrote {out / (name + '.txt')}")
    why = reasoning_available()
    print(f"reasoning-gym: {'available' if why is None else why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
