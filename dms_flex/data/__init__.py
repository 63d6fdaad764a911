"""Retrofit data: tokenizers, document packing, and offline data sets.

Modules: `tokenizers`, `packing`, `sources`, `reasoning`; the public names are exported here.

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
  present), `prose_dataset` (KJV and Austen without the evaluation's perplexity windows),
  `synthetic_dataset` (random tokens, no tokenizer), and `reasoning_dataset`: conversations
  of reasoning-gym problems answered greedily by the teacher itself (eviction off), cached as a chat
  jsonl that torchtune's ``chat_dataset`` reads, so a retrofit needs no network; `solved_reasoning_dataset`:
  many-shot conversations of solved reasoning-gym problems (reference answers) in the evaluation's prompt format.

``python -m dms_flex.data reasoning --checkpoint DIR`` builds the reasoning set ahead of a run.
"""

from .packing import IGNORE_INDEX, PackedDocuments
from .reasoning import (
    DEFAULT_INSTRUCTION,
    DEFAULT_TASKS,
    REASONING_GYM_HINT,
    build_reasoning_set,
    reasoning_dataset,
    solved_reasoning_dataset,
)
from .sources import DEFAULT_PY_MODULES, DocumentList, prose_dataset, python_sources_dataset, synthetic_dataset
from .tokenizers import SMOLLM2, HFTokenizer, byte_tokenizer, hf_tokenizer, resolve_model_dir

__all__ = [
    "IGNORE_INDEX",
    "PackedDocuments",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_TASKS",
    "REASONING_GYM_HINT",
    "build_reasoning_set",
    "reasoning_dataset",
    "solved_reasoning_dataset",
    "DEFAULT_PY_MODULES",
    "DocumentList",
    "python_sources_dataset",
    "prose_dataset",
    "synthetic_dataset",
    "SMOLLM2",
    "HFTokenizer",
    "byte_tokenizer",
    "hf_tokenizer",
    "resolve_model_dir",
]
