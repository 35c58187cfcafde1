"""Training-memory measures of a run: the process's peak resident memory, and the bytes of tensors
autograd saves for backward in one training step.

The saved bytes are counted exactly, as ``benchmarks/_common.py`` does: every tensor the forward
hands to autograd is seen through ``saved_tensors_hooks`` and its storage counted once. Storages of
the model's own parameters and buffers are left out (they are held anyway, saving them costs
nothing), so what remains is the activation memory a method adds or saves.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from ..core import rebuild
from ..train.batches import answer_logits_only, collate, takes_logits_to_keep
from ..train.data import Encoded


def peak_rss_bytes() -> int:
    """The largest resident set this process has had (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def probe_batch(enc: Encoded, batch_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The first `batch_size` training examples, padded: the same batch for every method and seed."""
    return collate(enc, list(range(min(batch_size, len(enc)))), pad_id)


def saved_for_backward_bytes(model: Any, batch: dict[str, torch.Tensor], per_token: bool = False) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward of
    `model` on `batch` (parameters and buffers excluded), as the trainer runs it (train mode,
    answer-only logits for token-level labels)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    total = 0

    @rebuild.transparent  # counting keeps tensors as they are: rebuilt inputs count as they are kept
    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in held:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    inputs = dict(batch)
    if per_token and takes_logits_to_keep(getattr(model, "model", model)):
        inputs = answer_logits_only(inputs)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**inputs).loss
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return total
