"""What pruning did: per-layer shapes and zeros, and the model's parameter counts before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.linear import is_linear, linear_weight
from ..core.targets import Spec, iter_sites, select


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, int]  # (out, in) after pruning
    zeros: int
    numel: int
    shape_before: tuple[int, int] | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class PruneReport:
    """``str(report)`` is a readable summary; `as_dict()` is what benchmarks and files keep."""

    method: str
    params_before: int
    params_after: int
    layers: list[LayerStats] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def zeros(self) -> int:
        return sum(s.zeros for s in self.layers)

    @property
    def layer_params(self) -> int:
        return sum(s.numel for s in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights in the pruned layers."""
        return self.zeros / max(self.layer_params, 1)

    @property
    def nonzero_params(self) -> int:
        return self.params_after - self.zeros

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params_before": self.params_before, "params_after": self.params_after,
                "nonzero_params": self.nonzero_params, "layer_params": self.layer_params,
                "sparsity": round(self.sparsity, 6), "layers": len(self.layers), **self.details}

    def __str__(self) -> str:
        removed = self.params_before - self.params_after
        return (f"{self.method}: {len(self.layers)} layers, sparsity {self.sparsity:.2%} of their "
                f"{self.layer_params:,} weights; model parameters {self.params_before:,} -> {self.params_after:,} "
                f"({removed:,} removed), non-zero {self.nonzero_params:,}")


def count_params(model: nn.Module) -> int:
    """Parameters of the model, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def layer_stats(model: nn.Module, names: list[str], before: dict[str, tuple[int, int]] | None = None) -> list[LayerStats]:
    modules = dict(iter_sites(model))
    out = []
    for name in names:
        weight = linear_weight(modules[name])
        out.append(LayerStats(name, tuple(weight.shape), int((weight == 0).sum()), weight.numel(),
                              (before or {}).get(name)))
    return out


@torch.no_grad()
def sparsity_report(model: nn.Module, targets: Spec = "all-linear") -> PruneReport:
    """Zeros per linear layer and parameter counts of a model as it is now (e.g. after loading)."""
    modules = dict(iter_sites(model))
    names = [n for n in select(model, targets) if is_linear(modules[n])]
    total = count_params(model)
    return PruneReport("measured", total, total, layer_stats(model, names))
