"""Documents packed into rows of exactly ``max_seq_len`` tokens (`PackedDocuments`).

Each row carries ``doc_ids`` (DMS decisions and attention never cross a document), next-token
``targets`` (-100 where nothing is predicted: padding, a document's last token, masked prompt tokens)
and ``valid`` (False on padding).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IGNORE_INDEX", "PackedDocuments"]

IGNORE_INDEX = -100  # torchtune's CROSS_ENTROPY_IGNORE_IDX


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

    def __init__(
        self,
        ds,
        max_seq_len: int,
        pad_id: int = 0,
        split_across_rows: bool = True,
        max_rows: Optional[int] = None,
        progress: bool = True,
    ):
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
            h.update(self._tokens[s : s + chunk].astype(np.int64).tobytes())
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
            tokens[pos : pos + n] = piece
            nxt = piece[1:].clone()
            nxt[~torch.from_numpy(self._keep[s + 1 : e])] = IGNORE_INDEX
            targets[pos : pos + n - 1] = nxt
            doc_ids[pos : pos + n] = d
            valid[pos : pos + n] = True
            pos += n
        doc_ids[pos:] = len(self.rows[idx])
        return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids, "valid": valid}
