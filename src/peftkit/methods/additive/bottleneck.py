"""The bottleneck network shared by the sequential and parallel adapters:
``f(x) = W_up · act(W_down · x + b_down) + b_up`` with W_down ∈ R^{m×d_in}, W_up ∈ R^{d_out×m}."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...core.config import MAX_SIZE, number, one_of, size
from ...errors import ConfigError, shown

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
                                           "tanh": nn.Tanh}
DEFAULT_BOTTLENECK = 64


def bottleneck_problems(bottleneck: int | None, reduction_factor: float | None, activation: str) -> Iterable[str]:
    """Validation shared by the adapter configs."""
    if bottleneck is not None and reduction_factor is not None:
        yield f"give bottleneck or reduction_factor, not both (got {shown(bottleneck)} and {shown(reduction_factor)})"
    yield from size("bottleneck", bottleneck, optional=True)
    yield from number("reduction_factor", reduction_factor, "> 0", lambda f: f > 0, optional=True)
    yield from one_of("activation", activation, sorted(ACTIVATIONS))


def bottleneck_size(dim: int, bottleneck: int | None, reduction_factor: float | None) -> int:
    """m from an explicit size, a reduction factor of the hidden size, or the default 64.

    Raises:
        ConfigError: a reduction factor so small that m would pass `MAX_SIZE`.
    """
    if bottleneck is not None:
        return bottleneck
    if reduction_factor is not None:
        if dim / reduction_factor > MAX_SIZE:
            raise ConfigError(f"reduction_factor={shown(reduction_factor)} makes a bottleneck of {dim / reduction_factor:.3g} "
                              f"for hidden size {dim}, more than {MAX_SIZE}; use a larger reduction_factor or bottleneck=...")
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
