"""The bottleneck network shared by the sequential and parallel adapters:
``f(x) = W_up · act(W_down · x + b_down) + b_up`` with W_down ∈ R^{m×d_in}, W_up ∈ R^{d_out×m}."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
                                           "tanh": nn.Tanh}
DEFAULT_BOTTLENECK = 64


def bottleneck_problems(bottleneck: int | None, reduction_factor: float | None, activation: str) -> Iterable[str]:
    """Validation shared by the adapter configs."""
    if bottleneck is not None and reduction_factor is not None:
        yield f"give bottleneck or reduction_factor, not both (got {bottleneck} and {reduction_factor})"
    if bottleneck is not None and not (isinstance(bottleneck, int) and bottleneck > 0):
        yield f"bottleneck must be a positive integer, got {bottleneck!r}"
    if reduction_factor is not None and not reduction_factor > 0:
        yield f"reduction_factor must be > 0, got {reduction_factor!r}"
    if activation not in ACTIVATIONS:
        yield f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"


def bottleneck_size(dim: int, bottleneck: int | None, reduction_factor: float | None) -> int:
    """m from an explicit size, a reduction factor of the hidden size, or the default 64."""
    if bottleneck is not None:
        return bottleneck
    if reduction_factor is not None:
        return max(1, int(dim // reduction_factor))
    return DEFAULT_BOTTLENECK


class Bottleneck(nn.Module):
    """``up(act(down(x)))``; parameters live in `dtype` (float32 over half-precision bases)."""

    def __init__(self, d_in: int, m: int, d_out: int, activation: str, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, m, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d_out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype))))
