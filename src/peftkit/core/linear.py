"""A uniform (out_features, in_features) view of the weight-bearing layers deltas attach to.

`nn.Linear` stores W as (out, in); transformers' GPT-2 `Conv1D` stores it as (in, out) and
computes `x @ W + b`; `nn.Embedding` stores (num_embeddings, dim). Methods talk to these helpers
instead of branching on layer types themselves.

Quantized layers (see `peftkit.quant`) take part through a small protocol: ``in_features``,
``out_features``, ``dequantized_weight()`` (the (out, in) weight in compute dtype), optionally
``load_dequantized_weight(w)`` (re-quantize, used when merging) and ``dequantized_module()`` (the
full-precision layer they stand for, used by ``merge(dequantize=True)``).
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
    return isinstance(module, LINEAR_TYPES) or is_quantized(module)


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


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` keeps its weight in quantized storage (the quantized-layer protocol)."""
    return hasattr(module, "dequantized_weight")


@torch.no_grad()
def dense_copy(module: nn.Module) -> nn.Module:
    """A full-precision layer equal to quantized `module` (its ``dequantized_module()`` if it has one,
    else an ``nn.Linear`` with the dequantized weight and a copy of the bias)."""
    if hasattr(module, "dequantized_module"):
        return module.dequantized_module()
    weight = module.dequantized_weight()
    bias = getattr(module, "bias", None)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


@torch.no_grad()
def store_dense(module: nn.Module, dense: nn.Module, original: torch.Tensor) -> float:
    """Write `dense`'s weight and bias back into quantized `module`, re-quantizing the weight only
    if it differs from `original` (the dequantized weight before the change).

    Returns the largest absolute weight change the re-quantization itself added (0.0 if none)."""
    bias, new_bias = getattr(module, "bias", None), getattr(dense, "bias", None)
    if isinstance(bias, torch.Tensor) and isinstance(new_bias, torch.Tensor):
        bias.copy_(new_bias.to(bias.dtype))
    weight = linear_weight(dense).detach()
    if torch.equal(weight, original):
        return 0.0
    module.load_dequantized_weight(weight)
    return (module.dequantized_weight().to(weight.dtype) - weight).abs().max().item()


def delta_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a delta's parameters should use at `base`: the base's float dtype, but float32
    over half-precision or quantized bases (adapters train in full precision there)."""
    weight = next((p for p in base.parameters() if p.is_floating_point()), None)
    if weight is None or weight.dtype in (torch.float16, torch.bfloat16) or hasattr(base, "dequantized_weight"):
        return torch.float32
    return weight.dtype


def compute_dtype(device: torch.device | str, default: torch.dtype) -> torch.dtype:
    """The dtype products run in on `device`: autocast's where it is on, else `default`."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else default


def device_of(base: nn.Module) -> torch.device:
    for tensor in (*base.parameters(), *base.buffers()):
        return tensor.device
    return torch.device("cpu")
