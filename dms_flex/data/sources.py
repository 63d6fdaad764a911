"""Offline training-data sources: `python_sources_dataset` (standard-library source files: long
documents, always present), `prose_dataset` (the evaluation's prose sources minus every perplexity window
the evaluation takes from them) and `synthetic_dataset` (random tokens, no tokenizer), as `DocumentList`s
of already-tokenized documents."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from .tokenizers import HFTokenizer

__all__ = ["DocumentList", "DEFAULT_PY_MODULES", "python_sources_dataset", "prose_dataset", "synthetic_dataset"]


class DocumentList(Dataset):
    """A list of already-tokenized documents ({"tokens", "labels"})."""

    def __init__(self, docs: List[Dict[str, List[int]]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.docs[i]


DEFAULT_PY_MODULES = (
    "json",
    "argparse",
    "textwrap",
    "dataclasses",
    "functools",
    "enum",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "difflib",
    "string",
    "tokenize",
    "pprint",
    "shlex",
    "configparser",
    "csv",
    "calendar",
    "ipaddress",
    "pathlib",
)


# top-level standard-library packages that `modules="all"` leaves out: tests, GUIs, demos, vendored installers
_NOT_ALL = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "__phello__"}
)


def _all_stdlib_files(stdlib: Path) -> List[Path]:
    """Every .py file of the standard library but tests (any ``test``/``tests`` folder), `_NOT_ALL` and
    private top-level modules, in a fixed order."""
    files = []
    for f in sorted(stdlib.rglob("*.py")):
        parts = f.relative_to(stdlib).parts
        if parts[0] in _NOT_ALL or parts[0].startswith("_") or any(p in ("test", "tests") for p in parts[:-1]):
            continue
        if len(parts) > 1 and not (stdlib / parts[0] / "__init__.py").is_file():
            continue  # a folder that is not a package (e.g. config-3.x)
        files.append(f)
    return files


def python_sources_dataset(
    tokenizer: HFTokenizer, modules: Union[Sequence[str], str] = DEFAULT_PY_MODULES, max_docs: Optional[int] = None
) -> DocumentList:
    """The source files of Python standard-library modules (a package contributes all its .py files),
    one document each: long, real text that every machine has. ``modules="all"``: every module and package
    but tests, GUIs and demos (`_all_stdlib_files`; about 11 MB of source on Python 3.11). The evaluation's
    held-out files (`dms_flex.eval.data.HELD_OUT_PY_FILES`, e.g. ``logging/__init__.py`` of the ``logging``
    package) are never among them, whatever the modules, so the code perplexity windows stay unseen
    (docs/design.md, "Retrofit data")."""
    from ..eval.data import HELD_OUT_PY_FILES

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    held_out = {(stdlib / rel).resolve() for rel in HELD_OUT_PY_FILES}
    if isinstance(modules, str) and modules != "all":
        raise ValueError(f"python_sources_dataset: modules must be a list of module names or 'all', got {modules!r}")
    files: List[Path] = _all_stdlib_files(stdlib) if modules == "all" else []
    for name in [] if modules == "all" else modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            raise ValueError(f"python_sources_dataset: no source file for module {name!r}")
        if spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                files += sorted(Path(loc).rglob("*.py"))
        else:
            files.append(Path(spec.origin))
    skipped = [f for f in map(Path.resolve, files) if f in held_out]
    if skipped:
        print(
            f"dms_flex: code: {len(skipped)} file(s) the evaluation holds out left out: "
            + ", ".join(str(f.relative_to(stdlib)) for f in skipped)
        )
        files = [f for f in files if f.resolve() not in held_out]
    if not files:
        raise ValueError(f"python_sources_dataset: modules {modules!r} hold only the evaluation's held-out files")
    docs = []
    for f in files[:max_docs]:
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        docs.append({"tokens": ids, "labels": list(ids)})
    return DocumentList(docs)


def prose_dataset(
    tokenizer: HFTokenizer,
    sources: Sequence[str] = ("kjv", "austen"),
    doc_chars: int = 32_000,
    held_out: Optional[Sequence[Sequence[int]]] = None,
    max_docs: Optional[int] = None,
) -> DocumentList:
    """English prose for the retrofit: the evaluation's prose sources (`dms_flex.eval.data`: the King James
    Bible, Jane Austen's novels; the same text the evaluation reads) with every perplexity window of the
    `held_out` (n windows, length) settings cut out (default `HELD_OUT_WINDOW_SETTINGS`: every setting the
    README and the benchmarks use), so a retrofit trained on it is still measured on unseen windows. The
    rest is cut at line ends into documents of at most `doc_chars` characters. A missing source raises
    ValueError saying how to install it."""
    from ..eval import data as evdata

    if doc_chars < 1000:
        raise ValueError(f"prose_dataset: doc_chars={doc_chars} is too small: use 1000 or more")
    settings = evdata.HELD_OUT_WINDOW_SETTINGS if held_out is None else tuple(tuple(x) for x in held_out)
    unknown = [n for n in sources if n not in ("kjv", "austen")]
    if unknown:
        raise ValueError(f"prose_dataset: unknown source(s) {unknown}; known: kjv, austen")
    notes: List[str] = []
    texts = evdata.load_texts(list(sources), log=notes.append)
    missing = [n for n in sources if n not in texts]
    if missing:
        raise ValueError(
            f"prose_dataset: source(s) {missing} not found on this machine: "
            + "; ".join(m for m in notes if "not found" in m)
            + ' (or train without them: \'dataset=["${reasoning}","${code}"]\')'
        )

    def encode(text: str) -> List[int]:
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    docs = []
    for name in sources:
        src = texts[name]
        text = src.text
        holes = evdata.held_out_spans(encode, tokenizer.decode, src, settings)
        kept, prev = [], 0
        for a, b in holes + [(len(text), len(text))]:
            if a > prev:
                kept.append((prev, a))
            prev = max(prev, b)
        used = 0
        for a, b in kept:
            while b - a >= 200:  # a sliver between two windows is not worth a document
                end = (
                    b
                    if b - a <= doc_chars
                    else (text.rfind("\n", a + doc_chars // 2, a + doc_chars) + 1 or a + doc_chars)
                )
                ids = tokenizer.encode(text[a:end], add_bos=True, add_eos=True)
                docs.append({"tokens": ids, "labels": list(ids)})
                used += end - a
                a = end
        print(
            f"dms_flex: prose {name}: {used / 1e6:.2f} of {len(text) / 1e6:.2f} MB used, "
            f"{sum(b - a for a, b in holes) / 1e6:.2f} MB held out ({len(holes)} spans of the evaluation's windows)"
        )
    return DocumentList(docs[:max_docs])


def synthetic_dataset(
    vocab_size: int = 256, num_docs: int = 256, min_len: int = 32, max_len: int = 512, seed: int = 0, tokenizer=None
) -> DocumentList:
    """Random documents with learnable structure (each repeats a few random motifs), for runs
    without any tokenizer. `tokenizer` is accepted and ignored (the recipe passes one to every
    dataset component)."""
    if not (2 <= min_len <= max_len) or vocab_size < 4:
        raise ValueError(
            f"synthetic_dataset needs 2 <= min_len <= max_len and vocab_size >= 4, got "
            f"min_len={min_len}, max_len={max_len}, vocab_size={vocab_size}"
        )
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        motifs = [
            torch.randint(3, vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in range(4)
        ]
        pick = torch.randint(0, 4, (n,), generator=g)
        ids = torch.cat([motifs[int(k)] for k in pick])[:n].tolist()
        docs.append({"tokens": ids, "labels": list(ids)})
    return DocumentList(docs)
