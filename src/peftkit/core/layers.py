"""A uniform (out_features, in_features) view of the weight-bearing layers deltas attach to.

`nn.Linear` stores W as (out, in); transformers' GPT-2 `Conv1D` stores it as (in, out) and
computes `x @ W + b`; `nn.Embedding` stores (num_embeddings, dim). Methods talk to these helpers
instead of branching on layer types themselves.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers is a hard dependency, but keep the core importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = type("Conv1D", (nn.Module,), {})

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for layers computing an affine map with a 2-D weight (Linear, Conv1D, and quantized
    linear layers that expose `in_features` / `out_features` and a `dequantized_weight()`)."""
    return isinstance(module, LINEAR_TYPES) or hasattr(module, "dequantized_weight")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view where possible. Quantized layers return a dequantized copy."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


@torch.no_grad()
def assign_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back into the layer, in the layer's own layout and dtype."""
    if hasattr(module, "load_dequantized_weight"):
        module.load_dequantized_weight(weight)
    elif isinstance(module, Conv1D):
        module.weight.copy_(weight.T.to(module.weight.dtype))
    else:
        module.weight.copy_(weight.to(module.weight.dtype))


def delta_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a delta's parameters should use at `base`: the base's float dtype, but float32
    over half-precision or quantized bases (adapters train in full precision there)."""
    weight = next((p for p in base.parameters() if p.is_floating_point()), None)
    if weight is None or weight.dtype in (torch.float16, torch.bfloat16) or hasattr(base, "dequantized_weight"):
        return torch.float32
    return weight.dtype


def device_of(base: nn.Module) -> torch.device:
    for tensor in (*base.parameters(), *base.buffers()):
        return tensor.device
    return torch.device("cpu")
