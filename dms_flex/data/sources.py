"""Offline training-data sources: `python_sources_dataset` (standard-library source files: long
documents, always present) and `synthetic_dataset` (random tokens, no tokenizer), as `DocumentList`s
of already-tokenized documents."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .tokenizers import HFTokenizer

__all__ = ["DocumentList", "DEFAULT_PY_MODULES", "python_sources_dataset", "synthetic_dataset"]


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


def python_sources_dataset(
    tokenizer: HFTokenizer, modules: Sequence[str] = DEFAULT_PY_MODULES, max_docs: Optional[int] = None
) -> DocumentList:
    """The source files of Python standard-library modules (a package contributes all its .py files),
    one document each: long, real text that every machine has."""
    files: List[Path] = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            raise ValueError(f"python_sources_dataset: no source file for module {name!r}")
        if spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                files += sorted(Path(loc).rglob("*.py"))
        else:
            files.append(Path(spec.origin))
    docs = []
    for f in files[:max_docs]:
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        docs.append({"tokens": ids, "labels": list(ids)})
    return DocumentList(docs)


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
