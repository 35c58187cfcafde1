"""LoRA's update ``s · B · A · dropout(x)`` as one autograd function that keeps little for backward.

Plain autograd keeps, per adapted projection, the dropped input ``dropout(x)`` (a full copy of x), the
dropout mask and ``h = A·dropout(x)``. This function keeps only x itself — one tensor however many
sibling projections read it — and the seed of its dropout mask: backward draws the same mask again
and recomputes the dropped input and h, cheap passes next to the layer's own matmuls.

The products are ordered the way CPU BLAS runs fast: a gradient of a skinny factor is computed as
``(r, N)·(N, d)`` and transposed, never as ``(d, N)·(N, r)``.

Shapes: x (…, in), A (r, in), B (out, r) → (…, out). With the same mask it computes exactly what
``F.linear(F.linear(x * mask / (1 - p), A), B) * s`` computes (tests/test_lora_kernel.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p, generator=generator)


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    return x if mask is None else x * mask / (1.0 - p)


class _LowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                seed: int | None, mask: torch.Tensor | None) -> torch.Tensor:
        if seed is not None:
            mask = _mask(x, p, seed)
        h = F.linear(_dropped(x, mask, p), A)  # (…, r)
        ctx.save_for_backward(x, A, B, mask if seed is None else None)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return F.linear(h, B) * scaling

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, mask = ctx.saved_tensors
        if ctx.seed is not None:
            mask = _mask(x, ctx.p, ctx.seed)
        dropped = _dropped(x, mask, ctx.p)
        grad_h = F.linear(grad, B.T) * ctx.scaling  # (…, r): the scale on the small side
        flat_h = grad_h.reshape(-1, grad_h.shape[-1])  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(grad_h, A.T)
            if mask is not None:
                grad_x = grad_x * mask / (1.0 - ctx.p)
        if ctx.needs_input_grad[1]:
            grad_A = flat_h.T @ dropped.reshape(-1, dropped.shape[-1])  # (r, N)·(N, in)
        if ctx.needs_input_grad[2]:
            h = F.linear(dropped, A).reshape(-1, A.shape[0])  # recomputed: cheaper than keeping it
            grad_B = (h.T @ grad.reshape(-1, grad.shape[-1])).T * ctx.scaling  # (r, N)·(N, out), transposed
        return grad_x, grad_A, grad_B, None, None, None, None


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0,
             training: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaling · B · A · dropout_p(x)``, with dropout only while `training`: a fresh Bernoulli mask
    (its seed drawn from torch's generator, so ``torch.manual_seed`` fixes it), or `mask` (True = kept)."""
    if not (p > 0 and training):
        return _LowRank.apply(x, A, B, scaling, 0.0, None, None)
    seed = None if mask is not None else int(torch.randint(0, 2**62, (1,)).item())
    return _LowRank.apply(x, A, B, scaling, p, seed, mask)
