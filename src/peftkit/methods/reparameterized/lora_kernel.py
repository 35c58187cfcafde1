"""LoRA's update ``y + s · B · A · dropout(x)`` as two small autograd functions that keep little for
backward and pass over large tensors as few times as they can.

- `down` computes ``h = dropout(x) · Aᵀ`` for every projection that reads x at once (query, key and
  value read the same hidden states: `SharedInput`), in one pass over x. It keeps one dropout mask shared
  by them, a byte per entry, never a dropped float copy of x; the 1/keep scale goes on the small h. Of x
  it keeps nothing when backward can rebuild x from what x's producer keeps anyway (a norm's input, a
  GELU's input, attention's probabilities and values: `core.rebuild`), else x itself, one tensor for all
  of them. Its backward computes every A gradient and the gradient for x in one pass each.
- `up` adds ``s · h · Bᵀ`` to the layer's output with one ``addmm`` (no separate product tensor, no
  second pass to add it; into the output itself when the host says no one else reads it), keeping only
  the small h: r/in of x's size, where recomputing it in backward would read x again per projection.
  The projections of one input keep views of one h for all of them.

Plain autograd keeps, per adapted projection, a dropped copy of x, the mask and h, and reads x once per
projection each way. Products are ordered the way CPU BLAS runs fast (skinny operands row-major, a
column slice of a shared h read in place; gradients of a skinny factor as ``(r, N)·(N, d)``, transposed).
The mask is `core.dropout`'s: 15 random bits per entry, four entries per random int64, applied as a
bitwise AND.

Under autocast both run in the autocast dtype, forward and backward, as a plain ``F.linear`` under
autocast does (`core.linear.compute_dtype`): x is kept as it comes (bfloat16 from a bfloat16 layer),
never upcast to a float32 copy, and the gradients of A and B are cast to their float32 parameters at the
end.

Shapes: x (…, in), A (r, in), B (out, r), y (…, out). With the same mask they compute what
``y + F.linear(F.linear(x * mask / keep, A), B) * s`` computes (tests/test_lora_kernel.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...core import rebuild
from ...core.dropout import LEVELS, from_bool, keep_levels, new_seed, random_mask, zero_dropped
from ...core.linear import compute_dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _stacked(As: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (As[0] if len(As) == 1 else torch.cat(As)).to(dtype)  # (Σr, in)


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: float, seed: int | None, mask: torch.Tensor | None,
                rebuilder: rebuild.Rebuilder | None, *As: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(As[0].device, As[0].dtype)
        given, x = x, x.to(dtype)
        # x is needed only for A's gradient; rebuilt in backward from what x's producer keeps when it can
        kept_x, ctx.rebuild_step = rebuild.saved_form(rebuilder, given, any(ctx.needs_input_grad[5:]), kept=x)
        if seed is not None:
            mask = random_mask(x, round(keep * LEVELS), seed)
        A = _stacked(As, dtype)
        # the mask: a byte per entry, a quarter of a float copy of x; A as the products use it, so backward
        # neither stacks nor casts it again, and only when x takes a gradient (the first layer's does not)
        ctx.save_for_backward(mask, A if ctx.needs_input_grad[0] else None, *kept_x)
        ctx.keep, ctx.dtypes, ctx.A_parts = keep, (dtype, given.dtype), [(a.shape[0], a.dtype) for a in As]  # (rows, dtype)
        h = F.linear(zero_dropped(x, mask), A)  # (…, Σr): all in one pass
        return h.mul_(1.0 / keep) if keep != 1.0 else h  # 1/keep on the small side

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mask, A, *kept_x = ctx.saved_tensors
        dtype, x_in = ctx.dtypes
        grad_h = grad_h.to(dtype)
        if ctx.keep != 1.0:
            grad_h = grad_h / ctx.keep
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = zero_dropped(F.linear(grad_h, A.T), mask).to(x_in)
        if not kept_x:
            return grad_x, None, None, None, None, *(None for _ in ctx.A_parts)
        x = rebuild.restored(ctx.rebuild_step, kept_x).to(dtype)
        grad_A = _rows(grad_h).T @ _rows(zero_dropped(x, mask))  # (Σr, N)·(N, in)
        grads = grad_A.split([rows for rows, _ in ctx.A_parts])
        return grad_x, None, None, None, None, *(g.to(a_dtype) for g, (_, a_dtype) in zip(grads, ctx.A_parts, strict=True))


class _Up(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor | None, h: torch.Tensor, B: torch.Tensor, scaling: float,
                overwrite: bool) -> torch.Tensor:
        dtype = compute_dtype(B.device, B.dtype)
        h, Bt = h.to(dtype), B.T.to(dtype).contiguous()  # (r, out)
        ctx.save_for_backward(h, Bt)  # Bt, not B: backward uses it as it is (no second cast and transpose)
        ctx.scaling, ctx.has_y, ctx.dtype, ctx.B_dtype, ctx.h_shape = scaling, y is not None, dtype, B.dtype, h.shape
        if y is None:
            return (_rows(h) @ Bt).mul_(scaling).view(*h.shape[:-1], B.shape[0])
        if overwrite and y.dtype == dtype and y.is_contiguous():  # no copy of the layer's output
            ctx.mark_dirty(y)
            _rows(y).addmm_(_rows(h), Bt, alpha=scaling)
            return y
        return torch.addmm(_rows(y).to(dtype), _rows(h), Bt, alpha=scaling).view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, Bt = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        # g·B with B's columns contiguous (the fast layout); y may have come as rows of h's leading dimensions
        grad_h = (F.linear(grad, Bt) * ctx.scaling).view(ctx.h_shape)
        grad_B = (_rows(h).T @ _rows(grad)).T * ctx.scaling  # (r, N)·(N, out), transposed
        return (grad if ctx.has_y else None), grad_h, grad_B.to(ctx.B_dtype), None, None


def down(x: torch.Tensor, As: Sequence[torch.Tensor], p: float = 0.0, training: bool = False,
         mask: torch.Tensor | None = None, rebuilder: rebuild.Rebuilder | None = None) -> list[torch.Tensor]:
    """``dropout_p(x) · A_iᵀ`` for each A_i, in one pass (views of one (…, Σr) result). Dropout only while
    `training`: one fresh keep-mask for all (its seed drawn from torch's generator, so
    ``torch.manual_seed`` fixes it; the kept share is `keep_levels`'s), or `mask` (True = kept). With a
    `rebuilder`, backward rebuilds x from what x's producer keeps where it can, instead of keeping x."""
    if not (p > 0 and training):
        keep, seed, mask = 1.0, None, None
    elif mask is not None:
        keep, seed, mask = 1.0 - p, None, from_bool(mask.to(torch.bool))
    else:
        keep, seed = keep_levels(p) / LEVELS, new_seed()
    h = _Down.apply(x, keep, seed, mask, rebuilder, *As)
    return list(h.split([A.shape[0] for A in As], dim=-1)) if len(As) > 1 else [h]


def up(y: torch.Tensor | None, h: torch.Tensor, B: torch.Tensor, scaling: float, *,
       overwrite: bool = False) -> torch.Tensor:
    """``y + scaling · h · Bᵀ`` in one ``addmm`` (just the product when `y` is None). `overwrite`:
    nothing else reads `y`, so the sum goes into y's own storage (no copy of y) and is returned there: y
    itself, or, for a view of a (rows, out) product, that product viewed as y."""
    if overwrite and y is not None and y._base is not None and torch.is_grad_enabled():
        # F.linear with a bias gives 3-D inputs a view of its (rows, out) product. Changed in place through the
        # view, autograd would copy the gradient through the base in backward: add into the rows themselves.
        rows = y._base
        if y.is_contiguous() and rows.is_contiguous() and rows.data_ptr() == y.data_ptr() and rows.shape == (
                y.numel() // y.shape[-1], y.shape[-1]):
            return _Up.apply(rows, h, B, scaling, True).view(y.shape)
        overwrite = False
    return _Up.apply(y, h, B, scaling, overwrite)


class SharedInput:
    """The LoRA deltas of one adapter at projections that read the same input (an attention's query,
    key and value; an MLP's gate and up): whichever runs first computes every member's h in one pass
    (`down`), and each member adds its own (`up`). Identity decides "the same input": a member called
    with another tensor recomputes for all, so grouping by structure can cost time, never correctness."""

    def __init__(self, members: Sequence[Any]) -> None:
        self.members = list(members)  # LoraLinear deltas: A, dropout_p, training
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def take(self, member: Any, x: torch.Tensor) -> torch.Tensor:
        """`member`'s h for input `x`."""
        if self._x is not x or id(member) not in self._pending:
            first = self.members[0]
            hs = down(x, [m.A for m in self.members], first.dropout_p, first.training, rebuilder=first.rebuilder)
            self._x, self._pending = x, {id(m): h for m, h in zip(self.members, hs, strict=True)}
        h = self._pending.pop(id(member))
        if not self._pending:
            self._x = None
        return h
