"""Batch order and padding.

The order of an epoch is a pure function of (seed, epoch, global batch size, pool), so a resumed run
sees exactly the batches it would have seen, and N data-parallel processes see the same global
batches as one process (each takes its slice). With `group_by_length`, examples are shuffled,
cut into pools of `pool` global batches (`pool_batches`), sorted by length inside each pool, and the batches
are shuffled again: less padding, still random.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from .data import IGNORE, Encoded

# Global batches per length-sorted pool. Larger pools pad less (a step's time follows its padded
# tokens) and mix lengths less within a batch. Sequence-level tasks take 16: the default job pads to 1.07x
# its real tokens against 1.27x at 4, at an accuracy within the seeds' spread
# (benchmarks/results/recipes.md). Token-level tasks keep 50: padding costs them most (vocabulary-wide logits).
POOL_BATCHES = {"sequence": 16, "token": 50}


def pool_batches(per_token: bool) -> int:
    """Global batches per length-sorted pool for data with token-level (or sequence-level) labels."""
    return POOL_BATCHES["token" if per_token else "sequence"]


_POOLED = "length-sorted pools of {}"


def batch_order(group_by_length: bool, pool: int) -> str:
    """How a run draws its batches, as its checkpoint records it."""
    return _POOLED.format(pool) if group_by_length else "random"


def recorded_pool(order: Any) -> int | None:
    """The pool size in a recorded `batch_order` (None for random batches or an unreadable record)."""
    match = re.fullmatch(_POOLED.format(r"([1-9]\d{0,5})"), order) if isinstance(order, str) else None
    return int(match.group(1)) if match else None


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether a transformers model's forward can compute logits for its last positions only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def trims_logits(model: torch.nn.Module, enc: Encoded) -> bool:
    """Whether batches of `enc` for `model` (a TunedModel or a transformers model) go through
    `answer_logits_only`: token-level labels and a forward that takes ``logits_to_keep``."""
    return enc.per_token and takes_logits_to_keep(getattr(model, "model", model))


def answer_logits_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ask a causal LM for logits only from the position before the first labelled token on.

    With answer-only loss masks most positions (system prompt, question) take no loss, yet the
    vocabulary projection and its backward would run on all of them (the largest layer of a small
    LM). Passing ``logits_to_keep=K`` with the labels trimmed to their last K columns gives the
    same loss: transformers' causal-LM loss shifts the labels it gets against the logits it made.
    """
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()
    if len(labelled) == 0 or int(labelled[0]) == 0:
        return batch
    keep = labels.shape[1] - int(labelled[0])  # from the position that predicts the first target
    return {**batch, "labels": labels[:, -keep:], "logits_to_keep": keep}


def epoch_batches(lengths: torch.Tensor, global_batch: int, seed: int, epoch: int, *,
                  group_by_length: bool = True, pool: int = POOL_BATCHES["sequence"],
                  min_size: int = 1) -> list[list[int]]:
    """Index lists of each global batch of `epoch`; batches smaller than `min_size` are dropped."""
    n = len(lengths)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    if not group_by_length:
        batches = [perm[i:i + global_batch] for i in range(0, n, global_batch)]
    else:
        lens = lengths.tolist()
        size = pool * global_batch
        batches = []
        for start in range(0, n, size):
            chunk = sorted(perm[start:start + size], key=lambda i: -lens[i])
            batches.extend(chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch))
        order = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in order]
    return [b for b in batches if len(b) >= min_size]


def micro_batches(batch: list[int], pieces: int) -> list[list[int]]:
    """Split a global batch into `pieces` contiguous, near-equal parts (similar lengths stay together)."""
    size, extra = divmod(len(batch), pieces)
    out, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        out.append(batch[start:end])
        start = end
    return out


def collate(enc: Encoded, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the sequences `index` of `enc` to their longest (right padding)."""
    lengths = [int(enc.offsets[i + 1] - enc.offsets[i]) for i in index]
    width = max(lengths)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    labels = torch.full((len(index), width), IGNORE, dtype=torch.long) if enc.per_token else None
    for row, (i, n) in enumerate(zip(index, lengths, strict=True)):
        a = int(enc.offsets[i])
        ids[row, :n] = enc.ids[a:a + n]
        mask[row, :n] = 1
        if labels is not None:
            labels[row, :n] = enc.labels[a:a + n]
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = labels if labels is not None else enc.labels[index]
    return out


def eval_batches(enc: Encoded, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Length-sorted batches for evaluation; with `world` > 1, this rank's share."""
    order = sorted(range(len(enc)), key=lambda i: -int(enc.offsets[i + 1] - enc.offsets[i]))
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
