"""Shared helpers of the hybrid recipes: the model's hidden size, and paper sizes scaled to it."""

from __future__ import annotations

from torch import nn

from ...core import arch
from ...core.linear import linear_dims
from ...errors import TargetError


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream: ``config.hidden_size`` or the FFN output size."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if isinstance(size, int):
        return size
    roles = arch.blocks(model)[0]
    if roles.ffn_out is None:
        raise TargetError(f"cannot tell the hidden size of {type(model).__name__}; give the sizes explicitly.")
    return linear_dims(model.get_submodule(roles.ffn_out))[1]


def scaled(paper_value: int, paper_hidden: int, hidden: int) -> int:
    """A size from a paper's model scaled linearly to a model of width `hidden` (at least 1)."""
    return max(1, round(paper_value * hidden / paper_hidden))
