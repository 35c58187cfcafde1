"""A learned (rows, dim) table, trained directly or through a reparameterising encoder.

Soft prompts, P-tuning's prompt encoder and prefix tuning's MLP all train a table of vectors; the
encoder (if any) exists only for training. What is saved is always the table the encoder produces,
and loading one stores it directly (the encoder is gone, as in the papers and in PEFT).
"""

from __future__ import annotations

import torch
from torch import nn


class LearnedTable(nn.Module):
    """``forward() -> (rows, dim)``: `values` itself, or ``encoder(inputs)`` while reparameterised."""

    def __init__(self, values: torch.Tensor, encoder: nn.Module | None = None) -> None:
        super().__init__()
        if encoder is None:
            self.values = nn.Parameter(values)
            self.encoder = None
        else:
            self.inputs = nn.Parameter(values)
            self.encoder = encoder

    def forward(self) -> torch.Tensor:
        return self.values if self.encoder is None else self.encoder(self.inputs)

    @torch.no_grad()
    def export(self) -> torch.Tensor:
        """The table as saved: the encoder's output, detached."""
        return self().detach().clone()

    def replace(self, values: torch.Tensor) -> None:
        """Store `values` directly, dropping any encoder; trainability follows the old parameters."""
        trainable = any(p.requires_grad for p in self.parameters())
        like = next(self.parameters())
        if self.encoder is not None:
            del self.encoder, self.inputs
            self.encoder = None
        else:
            del self.values
        self.values = nn.Parameter(values.detach().to(dtype=like.dtype, device=like.device).clone(),
                                   requires_grad=trainable)
