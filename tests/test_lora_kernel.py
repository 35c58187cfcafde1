"""LoRA's autograd function against plain autograd: the same outputs and gradients for the same
dropout mask, and less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.methods.reparameterized.lora_kernel import low_rank


def plain(x, A, B, scaling, mask, keep):
    dropped = x if mask is None else x * mask / keep
    return F.linear(F.linear(dropped, A), B) * scaling


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    return x, A, B


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_same_outputs_and_gradients_as_plain_autograd_for_the_same_mask(p):
    x, A, B = tensors()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p if p else None
    grad = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (plain, None):
        for t in (x, A, B):
            t.grad = None
        if fn is None:
            out = low_rank(x, A, B, 0.5, p, training=True, mask=mask)
        else:
            out = plain(x, A, B, 0.5, mask, 1 - p)
        out.backward(grad)
        results.append([out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    assert torch.equal(results[1][0], results[0][0])  # the forward is the same computation, bit for bit


def test_no_dropout_outside_training_and_a_fresh_mask_inside():
    x, A, B = tensors()
    assert torch.equal(low_rank(x, A, B, 1.0, 0.3, training=False), plain(x, A, B, 1.0, None, 1.0))
    torch.manual_seed(0)
    first = low_rank(x, A, B, 1.0, 0.3, training=True)
    torch.manual_seed(1)
    assert not torch.equal(first, low_rank(x, A, B, 1.0, 0.3, training=True))


def saved_bytes(fn) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return total


def test_keeps_less_for_backward_than_plain_autograd():
    """Two projections reading one input (query and value): plain autograd keeps a dropped copy of x,
    a mask and h for each; the kernel keeps x once and the small factors."""
    x = torch.randn(64, 128, 256, requires_grad=True)
    factors = [(torch.randn(8, 256, requires_grad=True), torch.randn(256, 8, requires_grad=True)) for _ in range(2)]
    masks = [torch.rand(x.shape) >= 0.1 for _ in range(2)]
    ours = saved_bytes(lambda: sum(low_rank(x, A, B, 2.0, 0.1, training=True) for A, B in factors))
    reference = saved_bytes(lambda: sum(plain(x, A, B, 2.0, m, 0.9) for (A, B), m in zip(factors, masks, strict=True)))
    x_bytes, small = x.numel() * 4, sum(A.numel() + B.numel() for A, B in factors) * 4
    assert ours <= x_bytes + small
    assert reference >= 2 * (x_bytes + x.numel())  # per projection: the dropped copy and a byte per mask entry
