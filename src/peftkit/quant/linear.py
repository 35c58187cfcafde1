"""`QuantLinear`: a frozen linear layer whose weight lives in quantized storage.

It implements the core's quantized-layer protocol (`core/linear.py`): ``in_features``,
``out_features``, ``dequantized_weight()`` and ``load_dequantized_weight(w)``, plus
``dequantized_module()`` (the full-precision layer it stands for), so every method that reads
or folds linear weights works on it unchanged.

Forward: ``y = x · deq(W)ᵀ + b`` in the compute dtype (default: the input's dtype). The weight is
dequantized on the fly in forward and again in backward, as QLoRA does, so training keeps no
weight-sized tensor alive; the weight is frozen, only the gradient with respect to x flows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.linear import Conv1D
from . import backends
from .spec import QuantSpec


class _DequantLinear(torch.autograd.Function):
    """x · deq(W)ᵀ with W re-dequantized in backward instead of saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantized_weight(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ ctx.layer.dequantized_weight(ctx.dtype), None, None  # (..., out) @ (out, in)


class QuantLinear(nn.Module):
    """A linear layer (from ``nn.Linear`` or GPT-2 ``Conv1D``) with quantized, frozen weights.

    Storage is a set of buffers (see `backends.py`), so ``.to(device)``, ``state_dict()`` and
    adapter merge backups handle it like any other module; dtype casts (``.half()``) leave the
    storage alone and only move it. The bias, if any, stays a (frozen) full-precision parameter.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, *, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, weight_dtype: torch.dtype = torch.float32,
                 conv1d: bool = False, device: torch.device | str | None = None) -> None:
        """An empty layer (storage allocated, not filled: load a weight or a state dict into it)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.conv1d = conv1d
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for key, (shape, dtype) in backends.storage_layout(spec, (out_features, in_features)).items():
            self.register_buffer(key, torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, spec: QuantSpec, compute_dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize an ``nn.Linear`` / ``Conv1D`` (the module itself is left untouched)."""
        conv1d = isinstance(module, Conv1D)
        weight = module.weight.T if conv1d else module.weight  # (out, in)
        layer = cls(weight.shape[1], weight.shape[0], spec, bias=module.bias, compute_dtype=compute_dtype,
                    weight_dtype=module.weight.dtype, conv1d=conv1d, device="meta")
        layer.load_dequantized_weight(weight)
        return layer

    # -- the quantized-layer protocol ---------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        stored = {k: v for k, v in self._buffers.items() if v is not None}
        stored.update({k: v for k, v in self._parameters.items() if v is not None and k != "bias"})
        return stored

    def storage_as_parameters(self) -> None:
        """Hold the storage tensors as frozen parameters instead of buffers, so that FSDP shards them
        (it shards parameters and replicates buffers; see `train/fsdp.py`). Scalars stay buffers."""
        for key, tensor in list(self._buffers.items()):
            if tensor is not None and tensor.dim() > 0:
                del self._buffers[key]
                self.register_parameter(key, nn.Parameter(tensor, requires_grad=False))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the compute dtype, else the original dtype)."""
        dtype = dtype or self.compute_dtype or self.weight_dtype
        return backends.decode(self._tensors(), self.spec, (self.out_features, self.in_features), dtype)

    @torch.no_grad()
    def load_dequantized_weight(self, weight: torch.Tensor) -> None:
        """Quantize and store an (out, in) full-precision weight (replaces the current storage)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected a ({self.out_features}, {self.in_features}) weight, got {tuple(weight.shape)}")
        for key, tensor in backends.encode(weight, self.spec).items():
            self.register_buffer(key, tensor)  # replaces the old tensor (and a meta placeholder)

    @torch.no_grad()
    def dequantized_module(self) -> nn.Module:
        """A full-precision ``nn.Linear`` (or ``Conv1D``) with the dequantized weight and this bias."""
        weight = self.dequantized_weight(self.weight_dtype)
        device = weight.device
        if self.conv1d:
            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
            module.bias = nn.Parameter(self.bias.detach().clone() if self.bias is not None
                                       else torch.zeros(self.out_features, device=device, dtype=weight.dtype),
                                       requires_grad=False)
            return module
        module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return module

    # -- running -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        h = x.to(dtype)
        if torch.is_grad_enabled() and h.requires_grad:
            y = _DequantLinear.apply(h, self, dtype)
        else:
            y = F.linear(h, self.dequantized_weight(dtype))
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Casts must not touch the storage (fp32 absmax cast to fp16 would corrupt it): buffers
        # only follow the device that `fn` maps to.
        stored = {k: v for k, v in self._buffers.items() if v is not None}
        for key in stored:
            del self._buffers[key]
        try:
            super()._apply(fn, recurse)
        finally:
            for key, tensor in stored.items():
                target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                self.register_buffer(key, tensor.to(target))
        return self

    # -- accounting --------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes of the quantized weight storage (code tables shared by all layers excluded)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        compute = str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else "input dtype"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.spec.describe()}, backend={self.spec.backend}, compute={compute}")
