"""Pruning scores and exact-count mask selection for SparseAdapter.

Scores (higher = keep), per pruned tensor W:

- ``magnitude``: |W| at initialisation;
- ``random``: uniform noise (seeded);
- ``snip`` (Lee et al., ICLR 2019): |g ⊙ W|, g the loss gradient summed over the calibration batches;
- ``grasp`` (Wang et al., ICLR 2020): GraSP removes the largest ``−W ⊙ Hg``, so it keeps the largest
  ``W ⊙ Hg``; the Hessian-gradient product Hg is taken by central differences of gradients
  (``(∇L(W + εg) − ∇L(W − εg)) / 2ε``), which needs no double backward and so works with any
  attention kernel.

Masks keep exactly ``round(n · (1 − sparsity))`` entries: over all tensors together (``global``) or
in each tensor (``per-layer``). Ties are broken in a seeded random order, so zero-initialised
tensors (LoRA's B) are pruned uniformly rather than by position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Scores = dict[str, torch.Tensor]


def kept_count(numel: int, sparsity: float) -> int:
    return int(round(numel * (1.0 - sparsity)))


def _top(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask over flat `scores` keeping exactly `k` entries, ties in a seeded random order."""
    flat = scores.detach().flatten().float().cpu()
    perm = torch.randperm(flat.numel(), generator=generator)
    order = torch.sort(flat[perm], descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[perm[order]] = True
    return keep


def select_masks(scores: Scores, sparsity: float, scope: str, seed: int) -> Scores:
    """Masks (same shapes and devices as `scores`) removing `sparsity` of the entries."""
    generator = torch.Generator().manual_seed(seed)
    if scope == "global":
        names = list(scores)
        total = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
        keep = _top(total, kept_count(total.numel(), sparsity), generator)
        masks, start = {}, 0
        for n in names:
            size = scores[n].numel()
            masks[n] = keep[start:start + size].view(scores[n].shape).to(scores[n].device)
            start += size
        return masks
    return {n: _top(s, kept_count(s.numel(), sparsity), generator).view(s.shape).to(s.device)
            for n, s in scores.items()}


def magnitude_scores(weights: Scores) -> Scores:
    return {n: w.detach().abs() for n, w in weights.items()}


def random_scores(weights: Scores, seed: int) -> Scores:
    generator = torch.Generator().manual_seed(seed + 1)
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


GradFn = Callable[[], Sequence[torch.Tensor]]


def snip_scores(weights: Scores, grads: Scores) -> Scores:
    return {n: (grads[n] * weights[n].detach()).abs() for n in weights}


@torch.no_grad()
def hessian_gradient(params: Sequence[torch.Tensor], grad: Sequence[torch.Tensor], grad_fn: GradFn,
                     step: float = 1e-3) -> list[torch.Tensor]:
    """Hg by central differences: params are moved along g and restored exactly (from copies)."""
    saved = [p.detach().clone() for p in params]
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grad)).item()
    scale = sum((p.float() ** 2).sum() for p in saved).sqrt().item()
    eps = step * max(scale, 1.0) / max(norm, 1e-12)
    plus, minus = [], []
    for sign, out in ((1.0, plus), (-1.0, minus)):
        for p, s, g in zip(params, saved, grad, strict=True):
            p.copy_(s + sign * eps * g.to(p.dtype))
        with torch.enable_grad():
            out.extend(g.detach() for g in grad_fn())
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)]


def grasp_scores(weights: Scores, hg: Scores) -> Scores:
    return {n: weights[n].detach() * hg[n] for n in weights}
