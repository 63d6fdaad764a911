"""The recipe's training data: the dataset components packed into rows with document ids, the
resumable sampler and data loader of each rank, and the fixed evaluation rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
from omegaconf import DictConfig, ListConfig

from dms_flex import data as dms_data

from .config_checks import RecipeError, instantiate


@dataclass
class TrainingData:
    packed: Any  # dms_flex.data.PackedDocuments
    sampler: Any  # StatefulDistributedSampler
    dataloader: Any  # StatefulDataLoader
    eval_batches: List[Dict[str, torch.Tensor]]
    fingerprint: Dict[str, Any]


def dataset_repeats(cfg: DictConfig, n_parts: int) -> List[int]:
    """`dataset_repeat`: how many times each part of `dataset` contributes its documents (one integer >= 1 per
    part, in the order of the list; default 1 each): a part's weight in the mix without duplicating its
    config. RecipeError, saying what is expected, on anything else."""
    value = cfg.get("dataset_repeat", None)
    if value is None:
        return [1] * n_parts
    items = list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]
    if len(items) != n_parts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in items):
        raise RecipeError(
            f"dataset_repeat={items} is invalid: give one whole number >= 1 per dataset part ({n_parts} part(s)), "
            f"e.g. dataset_repeat=[{', '.join(['1'] * n_parts)}]"
        )
    return items


def build_training_data(
    cfg: DictConfig,
    tokenizer,
    *,
    total_steps: int,
    grad_accum: int,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    log: Callable[[str], None],
    synthetic=None,
) -> TrainingData:
    """`synthetic`: the recipe's BenchmarkSettings when its data are synthetic (dms_flex/retrofit/random_init.py):
    random documents replace cfg.dataset; they are packed the same way."""
    from torch.utils.data import ConcatDataset
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    rows_needed = total_steps * grad_accum * batch_size * world_size
    parts = cfg.dataset if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
    datasets = []
    if synthetic is not None:
        from .random_init import synthetic_dataset

        parts = []
        datasets.append(synthetic_dataset(cfg, synthetic, tokenizer.vocab_size, rows_needed, seed))
    repeats = dataset_repeats(cfg, len(parts)) if parts else []
    for part, times in zip(parts, repeats):
        if part.get("packed", False):
            raise RecipeError(
                "dataset.packed=true: leave packing to the recipe (it needs document ids); set "
                "packed: false and choose max_seq_len / split_across_rows at the top level"
            )
        datasets += [instantiate(part, "dataset", tokenizer)] * times  # the same documents `times` over
    ds = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    packed = dms_data.PackedDocuments(
        ds,
        int(cfg.max_seq_len),
        pad_id=tokenizer.pad_id,
        split_across_rows=bool(cfg.get("split_across_rows", True)),
        max_rows=rows_needed,
        progress=rank == 0,
    )
    per_batch = batch_size * world_size
    if len(packed) < per_batch:
        raise RecipeError(
            f"the data packs into {len(packed)} row(s) of {cfg.max_seq_len} tokens, fewer than "
            f"one batch ({batch_size} x {world_size} rank(s)): add data or lower max_seq_len / batch_size"
        )
    sampler = StatefulDistributedSampler(
        packed, num_replicas=world_size, rank=rank, shuffle=bool(cfg.get("shuffle", True)), seed=seed, drop_last=True
    )
    dataloader = StatefulDataLoader(packed, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=0)
    # the same number of eval rows on every rank (FSDP runs every forward on all ranks together)
    n_eval = min(int(cfg.get("eval_batches", 1)) * batch_size, len(packed) // world_size)
    rows = [rank + world_size * k for k in range(n_eval)]
    eval_batches = [
        torch.utils.data.default_collate([packed[i] for i in rows[s : s + batch_size]])
        for s in range(0, len(rows), batch_size)
    ]
    epochs = rows_needed / max(len(packed), 1)
    log(
        f"data: {packed.documents} documents, {packed.real_tokens} tokens in {len(packed)} "
        f"rows of {cfg.max_seq_len}; {total_steps} steps x {grad_accum * batch_size} rows x "
        f"{world_size} rank(s) = {max(epochs, 1.0):.1f} epoch(s)"
    )
    return TrainingData(packed, sampler, dataloader, eval_batches, packed.fingerprint())
