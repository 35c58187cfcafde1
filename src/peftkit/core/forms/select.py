"""Deltas the engine itself needs, whatever the method: a trainable copy of a module (task heads,
``trainable_modules``) and a trainable bias shift. Both are the *select* form: existing parameters
made trainable, stored as separate tensors so the base stays pristine and `disabled()` is exact."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import TargetError
from ..linear import is_quantized
from ..protocol import Delta


def _trained_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class TrainableCopy(Delta):
    """A full trainable copy of the site's parameters; the base keeps its originals.

    Saved as the tuned values themselves (a new task head has no meaningful base to diff from).
    """

    form = "select"
    mergeable = True
    holds_values = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if is_quantized(base):
            raise TargetError(f"cannot train a full copy of a quantized {type(base).__name__}: its weight is stored "
                              "quantized and frozen. Adapt it with a delta method (lora, ia3, ...) instead, or "
                              "dequantize it first (peftkit.quant.dequantize).")
        self.values = nn.ParameterDict(  # float32 over a half-precision base: the trained copy is the master
            {name.replace(".", "__"): nn.Parameter(p.detach().to(_trained_dtype(p)).clone())
             for name, p in base.named_parameters()}
        )

    def _named_values(self) -> dict[str, torch.Tensor]:
        return {key.replace("__", "."): value for key, value in self.values.items()}

    def param_overrides(self, base: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(base.named_parameters())
        return {name: value.to(params[name].dtype) for name, value in self._named_values().items()}

    def fold(self, base: nn.Module) -> None:
        params = dict(base.named_parameters())
        for name, value in self._named_values().items():
            params[name].copy_(value.to(params[name].dtype))


class BiasShift(Delta):
    """``y = base(x) + Δb``: a trainable shift of an existing bias, stored as the difference."""

    form = "select"
    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        bias = getattr(base, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{type(base).__name__} has no bias to shift")
        self.shift = nn.Parameter(torch.zeros_like(bias, dtype=torch.float32))

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        return self.shift

    def fold(self, base: nn.Module) -> None:
        base.bias.add_(self.shift.to(base.bias.dtype))

