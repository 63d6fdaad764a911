"""The retrofit's prose data leaves out every perplexity window the evaluation takes from the same text
(dms_flex.data.prose_dataset; docs/design.md, "Retrofit data"). Checked by locating each training document
and each evaluation window in the source text, independently of how the held-out spans are computed."""

import random

import pytest

from dms_flex.data import byte_tokenizer, prose_dataset
from dms_flex.eval import data as eval_data

TOK = byte_tokenizer()
WORDS = "and the of unto he said thou shalt not be with them for his land which were in".split()


def encode(text):
    return TOK.encode(text, add_bos=False, add_eos=False)


def fake_prose(n_lines, seed):
    rng = random.Random(seed)
    # every line starts with a unique tag, so any slice of more than a line occurs once in the text
    return "".join(
        f"L{seed}-{i:06d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        for i in range(n_lines)
    )


@pytest.fixture
def texts(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "kjv_text", lambda: None)
    monkeypatch.setattr(eval_data, "austen_text", lambda: None)
    monkeypatch.setenv("DMS_FLEX_TEXT_DIR", str(tmp_path))
    out = {"kjv": fake_prose(1500, 1), "austen": fake_prose(60, 2)}  # austen: short, cut from one tokenization
    for name, text in out.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return out


SETTINGS = ((1, 64), (2, 64), (3, 100), (4, 150), (2, 200))


def located(text, piece):
    at = text.find(piece)
    assert at >= 0 and text.find(piece, at + 1) < 0, "a slice must occur exactly once in the fake text"
    return at, at + len(piece)


def test_no_training_document_overlaps_an_evaluation_window(texts):
    ds = prose_dataset(TOK, doc_chars=2000, held_out=SETTINGS)
    spans = {name: [] for name in texts}
    for doc in ds.docs:
        piece = TOK.decode(doc["tokens"])
        assert len(piece) <= 2000
        name = next(n for n, t in texts.items() if piece in t)
        spans[name].append(located(texts[name], piece))
    n_windows = 0
    for name, text in texts.items():
        src = eval_data.TextSource(name, text, "test")
        for n, length in SETTINGS:
            for window in eval_data.windows_of(encode, src, n, length):
                wa, wb = located(text, TOK.decode(window))
                n_windows += 1
                for da, db in spans[name]:
                    assert db <= wa or da >= wb, f"{name} window ({n}, {length}) at {wa}:{wb} overlaps a document"
    assert n_windows == 2 * sum(n for n, _ in SETTINGS)
    # what is not held out is used, save slivers under 200 characters between two windows
    for name, text in texts.items():
        holes = eval_data.held_out_spans(encode, TOK.decode, eval_data.TextSource(name, text, "t"), SETTINGS)
        used = sum(b - a for a, b in spans[name])
        assert used >= len(text) - sum(b - a for a, b in holes) - 200 * (len(holes) + 1)
        assert used > 0.3 * len(text)


def test_window_spans_hold_their_windows_for_long_and_short_texts(texts):
    for name, text in texts.items():
        src = eval_data.TextSource(name, text, "test")
        for n, length in SETTINGS:
            for (a, b), window in zip(
                eval_data.window_spans(encode, TOK.decode, src, n, length), eval_data.windows_of(encode, src, n, length)
            ):
                assert TOK.decode(window) in text[a:b]


def test_documents_are_cut_at_line_ends(texts):
    ds = prose_dataset(TOK, sources=("kjv",), doc_chars=3000, held_out=((1, 64),))
    pieces = [TOK.decode(d["tokens"]) for d in ds.docs]
    assert all(d["tokens"][0] == TOK.bos_id and d["tokens"][-1] == TOK.eos_id for d in ds.docs)
    assert sum(p.endswith("\n") for p in pieces) >= len(pieces) - 2  # the text's end and a hole's edge may cut a line
    assert max(len(p) for p in pieces) <= 3000 and min(len(p) for p in pieces[:-1]) >= 1500


def test_missing_or_unknown_sources_are_messages(texts, tmp_path):
    (tmp_path / "austen.txt").unlink()
    with pytest.raises(ValueError, match=r"\['austen'\] not found.*fetch-austen.*'dataset=\[\"\$\{reasoning\}\","):
        prose_dataset(TOK)
    with pytest.raises(ValueError, match="unknown source"):
        prose_dataset(TOK, sources=("wiki",))
    with pytest.raises(ValueError, match="doc_chars"):
        prose_dataset(TOK, sources=("kjv",), doc_chars=10)


def test_code_source_never_holds_the_evaluations_held_out_files():
    """The code perplexity windows come from `HELD_OUT_PY_FILES`; packages a config names for training (the
    SmolLM2 configs name `logging` and `collections`) contain two of them as their __init__.py. Checked by
    decoding each training document and comparing it with each held-out file's text."""
    import sysconfig
    from pathlib import Path

    from dms_flex.data import python_sources_dataset

    root = Path(sysconfig.get_paths()["stdlib"])
    held = {rel: (root / rel).read_text(encoding="utf-8", errors="replace") for rel in ("logging/__init__.py",)}
    assert "logging/__init__.py" in eval_data.HELD_OUT_PY_FILES
    n_files = len(list((root / "logging").rglob("*.py")))
    docs = python_sources_dataset(TOK, ["logging", "json"])
    texts = [TOK.decode(d["tokens"]) for d in docs]
    assert len(docs) == n_files - 1 + len(list((root / "json").rglob("*.py")))
    assert not any(held["logging/__init__.py"].strip() in t for t in texts)
    assert any("class RotatingFileHandler" in t for t in texts)  # logging/handlers.py stays
    with pytest.raises(ValueError, match="held-out"):
        python_sources_dataset(TOK, ["inspect"])


def test_code_source_all_modules():
    """modules="all": the whole standard library but tests, GUIs and private modules, and never a held-out file."""
    import sysconfig
    from pathlib import Path

    from dms_flex.data import python_sources_dataset
    from dms_flex.data.sources import _all_stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rel = {str(f.relative_to(root)) for f in _all_stdlib_files(root)}
    assert {"json/decoder.py", "argparse.py", "email/message.py"} <= rel
    assert not any(r.startswith(("test/", "tkinter/", "idlelib/", "_")) or "/tests/" in r for r in rel)
    docs = python_sources_dataset(TOK, "all", max_docs=3)
    first_three = sorted(r for r in rel if r not in eval_data.HELD_OUT_PY_FILES)[:3]
    assert [TOK.decode(d["tokens"]).strip()[:200] for d in docs] == [
        (root / r).read_text(encoding="utf-8", errors="replace").strip()[:200] for r in first_three
    ]
    with pytest.raises(ValueError, match="'all'"):
        python_sources_dataset(TOK, "json")
