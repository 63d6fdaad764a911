"""Offline evaluation text: perplexity windows and long-context haystacks (the probes built from it are in
`dms_flex.eval.probes`, the reasoning-gym items in `dms_flex.eval.reasoning`; both re-exported here).

Text sources (found if installed, else skipped with a message; Python's own sources always exist):
- ``kjv``: the King James Bible from Debian's ``bible-kjv`` (the ``bible`` program prints it).
  Install: ``apt-get install bible-kjv``.
- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (an R lazy-load data
  base, read with the PyPI package ``rdata``; R itself is not needed). Install without R:
  ``python -m dms_flex.eval.data --fetch-austen`` (``apt-get download`` + ``dpkg -x`` into
  ``$DMS_FLEX_HOME/data``), or ``apt-get install r-cran-janeaustenr``; plus ``pip install rdata``.
- ``code``: Python standard-library sources, from modules the retrofit data
  (``dms_flex.data.DEFAULT_PY_MODULES``) does not use, so they stay held out.
- ``user``: the user's own text, ``python -m dms_flex.eval --text-file PATH``: one UTF-8 file, or a folder
  whose ``.txt`` files (its subfolders too) are joined in path order, a blank line between two files.
On a machine without the Debian packages (a GPU box without network), plain-text copies work:
``python -m dms_flex.eval.data --export DIR`` writes ``DIR/kjv.txt`` and ``DIR/austen.txt`` where the
packages are installed; set ``DMS_FLEX_TEXT_DIR=DIR`` where they are not (default
``$DMS_FLEX_HOME/data``).

``python -m dms_flex.eval.data`` prints which sources are found.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .probes import (  # noqa: F401  (re-exported: dms_flex.eval.data is where callers found them)
    NEEDLE_QUESTION,
    VAR_QUESTION,
    Decode,
    Encode,
    ProbeItem,
    needle_item,
    probe_items,
    score_needle,
    score_probe,
    score_vartrack,
    vartrack_item,
)
from .reasoning import (  # noqa: F401
    REASONING_GYM_HINT,
    REASONING_INSTRUCTION,
    REASONING_SEED,
    ReasoningItem,
    extract_answer,
    reasoning_available,
    reasoning_items,
)

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


def _text_window_slices(encode: Encode, text: str, n: int, length: int, chars_per_token: float = 6.0):
    """(first character, end character, token ids) of the n windows `text_windows` takes: each window is
    the first `length` tokens of text[first:end]."""
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
        out.append((s, min(s + chunk_len, len(text)), list(ids[:length])))
    return out


def text_windows(encode: Encode, text: str, n: int, length: int, chars_per_token: float = 6.0) -> List[List[int]]:
    """n windows of exactly `length` tokens, starting at evenly spaced places of the text (each
    window is one tokenization of a slice, so no window straddles a cut-up token)."""
    return [ids for _, _, ids in _text_window_slices(encode, text, n, length, chars_per_token)]


def user_text(path) -> TextSource:
    """--text-file PATH: a UTF-8 text file, or a folder whose .txt files (subfolders included) are joined in
    path order with a blank line between two files. Bad input raises FileNotFoundError / ValueError saying
    what was wrong and what to do."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"--text-file {path}: no such file or folder (give a UTF-8 text file or a folder of .txt files)"
        )
    files = sorted(f for f in root.rglob("*.txt") if f.is_file()) if root.is_dir() else [root]
    if not files:
        raise ValueError(
            f"--text-file {path}: the folder holds no .txt file (put UTF-8 .txt files in it, or give one file)"
        )
    parts = []
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--text-file: {f} is not UTF-8 text (byte {e.start}: {e.reason}); convert it first, e.g. "
                f"iconv -f latin1 -t utf-8 {f} > {f.with_suffix('.utf8.txt').name}"
            ) from None
        if text.strip():
            parts.append(text)
    if not parts:
        raise ValueError(f"--text-file {path}: {'every .txt file is' if root.is_dir() else 'the file is'} empty")
    what = f"{len(files)} .txt files under {root}" if root.is_dir() else str(root)
    return TextSource("user", "\n\n".join(parts), f"--text-file {what}")


def _window_plan(encode: Encode, source: TextSource, n: int, length: int):
    """The rule behind `windows_of` and `window_spans`: ("slices", [(first char, end char, ids)]) for a long
    text, else ("tokens", (ids of the whole text, token starts))."""
    if len(source.text) > 4 * n * (length * 6 + 64):
        return "slices", _text_window_slices(encode, source.text, n, length)
    ids = encode(source.text)
    if len(ids) < n * length:
        fit = len(ids) // length
        how = (
            f"--ppl-windows {fit} or --ppl-len {len(ids) // n}"
            if fit >= 1
            else f"--ppl-windows 1 --ppl-len {len(ids)} (with a --ppl-prefix below it)"
        )
        raise ValueError(
            f"{source.name} text ({source.origin}) has {len(ids)} tokens: {n} window(s) of {length} tokens need "
            f"{n * length}; use {how}, or a longer text"
        )
    gap = len(ids) - n * length
    return "tokens", (ids, [i * length + (i * gap) // max(n - 1, 1) for i in range(n)])


def windows_of(encode: Encode, source: TextSource, n: int, length: int) -> List[List[int]]:
    """n perplexity windows of `length` tokens from a source: from evenly spaced slices of a long text
    (`text_windows`), else from one tokenization of the whole text, cut into n windows that do not
    overlap; a text with fewer than n * length tokens raises ValueError with the settings that fit."""
    kind, plan = _window_plan(encode, source, n, length)
    if kind == "slices":
        return [ids for _, _, ids in plan]
    ids, starts = plan
    return [list(ids[s : s + length]) for s in starts]


# The perplexity-window settings (--ppl-windows, --ppl-len) whose windows of the prose sources the retrofit's
# prose data (`dms_flex.data.prose_dataset`) leaves out: every setting the README, the benchmarks and the
# evaluation's defaults use, so their perplexity is measured on text no retrofit trained on.
HELD_OUT_WINDOW_SETTINGS = tuple((n, length) for n in (1, 2, 4, 8, 16) for length in (512, 1024, 2048, 4096))


def window_spans(encode: Encode, decode: Decode, source: TextSource, n: int, length: int) -> List[tuple]:
    """(first character, end character) of each window `windows_of` takes from the source: a window's tokens
    all come from text[first:end]. Short texts (cut from one tokenization) map token starts to characters
    through `decode` of the prefix."""
    kind, plan = _window_plan(encode, source, n, length)
    if kind == "slices":
        return [(a, b) for a, b, _ in plan]
    ids, starts = plan
    return [(len(decode(ids[:s])), min(len(decode(ids[: s + length])) + 1, len(source.text))) for s in starts]


def held_out_spans(
    encode: Encode, decode: Decode, source: TextSource, settings=HELD_OUT_WINDOW_SETTINGS
) -> List[tuple]:
    """The merged character spans of every window that the given (n, length) settings take from the
    source; a setting the text is too short for takes nothing."""
    spans = []
    for n, length in settings:
        try:
            spans += window_spans(encode, decode, source, n, length)
        except ValueError:
            continue
    merged: List[list] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [tuple(m) for m in merged]


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
