"""Dropout with its keep-mask drawn from 15 random bits per entry and applied as a bitwise AND, and a
switch that gives a model's own dropout layers that mask for the length of a training run.

PyTorch's CPU dropout draws one Bernoulli sample per entry (``bernoulli_``), a large share of a BERT-sized
encoder's training step (``benchmarks/results/perf.md``). Here each random int64 gives four 16-bit chunks;
each chunk, shifted to 15 bits and compared against a threshold by subtraction and a sign shift (plain int16
arithmetic, no boolean tensor), becomes -1 (every bit set: kept) or 0 (dropped), stored as int8 — a byte per
entry, as a boolean mask. Zeroing the dropped entries is then an AND of the tensor's bits with the mask
(`zero_dropped`): comparisons to booleans and ``torch.where`` with a boolean condition are several times
slower on a CPU than integer arithmetic over the same bytes. The kept share is exact in steps of 1/32,768
(``keep_levels``) and the survivors are scaled by the inverse of that share, so the expectation is
unchanged. The mask is a function of a seed drawn from torch's generator, so ``torch.manual_seed`` fixes it
as it fixes ``nn.Dropout``'s (the draws themselves differ from ``nn.Dropout``'s).

`FastDropout` keeps the mask for backward, as ``nn.Dropout`` does; `fast_dropout(model)` swaps every
``nn.Dropout`` in a model for one while a block runs, and puts the originals back however the block ends.
Off the CPU (CUDA's dropout is one fused kernel) and under ``torch.compile`` it is plain ``F.dropout``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 15  # the keep probability in steps of 1/32768
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer view of each float width


def keep_levels(p: float) -> int:
    """Of the 32,768 values a random 15-bit number takes, how many keep an entry: ``round((1 - p)·32768)``.
    The kept share is then exact in steps of 1/32768, and the scale is its inverse."""
    return round((1.0 - p) * LEVELS)


def random_mask(like: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """A keep-mask shaped like `like`: int8, -1 (kept) with probability ``levels / 32768``, else 0. Four
    entries come from each random int64 drawn over the full 64-bit range: each 16-bit chunk, shifted right
    by one (15 random bits, so the subtraction below cannot overflow), minus the threshold, has its sign
    bit set exactly for the `levels` smallest values; shifting the sign across the word gives -1 or 0."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    words = torch.empty((like.numel() + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int16)[: like.numel()] >> 1  # in [-16384, 16384)
    bits -= levels - LEVELS // 2
    bits >>= 15
    return bits.to(torch.int8).view(like.shape)


def from_bool(mask: torch.Tensor) -> torch.Tensor:
    """A boolean keep-mask (True = kept) in `random_mask`'s form."""
    return mask.to(torch.int8).neg_()


def new_seed() -> int:
    """A mask seed from torch's default generator (so ``torch.manual_seed`` decides it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def zero_dropped(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Float `t` with the entries `mask` (`random_mask`'s form) drops zeroed, as a new tensor (`t` itself
    when `mask` is None): an AND of its bits with the mask's sign-extended bits, all ones where kept."""
    if mask is None:
        return t
    return (t.view(_BITS[t.element_size()]) & mask).view(t.dtype)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        levels = keep_levels(p)
        mask = random_mask(x, levels, new_seed())
        ctx.save_for_backward(mask)
        ctx.scale = LEVELS / levels
        return zero_dropped(x, mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return zero_dropped(grad, mask).mul_(ctx.scale), None


def masked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` with probability `p` in (0, 1), its mask drawn as above (a seed from
    torch's generator) and kept for backward."""
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as above (same `p`, same training switch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p in (0, 1) or torch.compiler.is_compiling() or not x.is_floating_point()
                or x.device.type != "cpu"):  # CUDA's dropout is one fused kernel already
            return F.dropout(x, self.p, self.training, self.inplace)
        return masked_dropout(x, self.p)


@contextlib.contextmanager
def fast_dropout(model: nn.Module) -> Iterator[int]:
    """Every ``nn.Dropout`` of `model` (exactly that class, not subclasses with their own behaviour) is a
    `FastDropout` with the same settings inside the block; yields how many were swapped."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    fast = FastDropout(child.p, child.inplace)
                    fast.train(child.training)
                    setattr(parent, name, fast)
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
