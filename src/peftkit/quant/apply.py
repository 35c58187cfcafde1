"""Quantizing a model's linear layers in place, undoing it, and measuring what it saved."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.host import Host
from ..core.linear import LINEAR_TYPES
from ..core.targets import LayerSpec, Spec, get_site, iter_sites, select, set_site
from ..core.tuned import TunedModel
from ..errors import AdapterStateError, TargetError
from . import backends, memory
from .linear import QuantLinear
from .spec import QuantSpec, parse_dtype


def _raw(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, TunedModel) else model


def _replace(model: nn.Module, site: str, module: nn.Module) -> None:
    """Put `module` at `site`; a site wrapped by adapters gets a new base layer."""
    current = get_site(model, site)
    if isinstance(current, Host):
        if current.merged:
            raise AdapterStateError(f"{site} has merged adapters {current.merged_adapters}; call "
                                    "tuned.unmerge_adapter() before changing its base layer.")
        current.base_layer = module
    else:
        set_site(model, site, module)


def _shared_weights(model: nn.Module) -> set[int]:
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in uses.items() if n > 1}


def quantize(model: nn.Module, scheme: str = "nf4", *, double_quant: bool = True, blocksize: int = 64,
             compute_dtype: torch.dtype | str | None = None, targets: Spec = "all-linear", exclude: Spec = None,
             layers: LayerSpec = None, backend: str = "torch") -> nn.Module:
    """Replace the model's linear layers by `QuantLinear` layers, in place; returns the model.

    Args:
        scheme: "nf4" (QLoRA's 4-bit NormalFloat), "fp4" (bitsandbytes' 4-bit float) or "int8"
            (per-row absmax).
        double_quant: also quantize the 4-bit absmax values (8-bit, blocks of 256): 0.516 instead
            of 0.5625 bytes per weight.
        blocksize: weights per absmax block (4-bit schemes).
        compute_dtype: dtype of the dequantized weight in matmuls; None follows the input.
        targets / exclude / layers: which linear layers, as for any method (default every linear
            layer except the output and task heads). Layers that are already quantized are skipped.
        backend: "torch" (no dependency) or "bitsandbytes" (faster 4-bit kernels; optional extra).

    Works on a plain model or a `TunedModel` (adapters stay attached to the new base layers).
    Deltas keep training in full precision on top.

    Raises:
        ConfigError: invalid options, or a backend that is not installed.
        TargetError: targets that match no linear layer, or a weight shared with another module.
        AdapterStateError: a selected layer has adapters merged into it.
    """
    spec = QuantSpec(scheme, double_quant, blocksize, backend)
    dtype = parse_dtype(compute_dtype)
    backends.check_available(spec)
    raw = _raw(model)
    sites = select(raw, targets, exclude=exclude, layers=layers, accept=lambda m: isinstance(m, (*LINEAR_TYPES, QuantLinear)),
                   accept_label="nn.Linear and Conv1D layers")
    modules = dict(iter_sites(raw))
    todo = [s for s in sites if isinstance(modules[s], LINEAR_TYPES)]
    shared = _shared_weights(raw)
    tied = [s for s in todo if id(modules[s].weight) in shared]
    if tied:
        raise TargetError(f"{', '.join(tied[:3])} share their weight with another module (tied embeddings); "
                          "quantizing would untie them. Add them to exclude=[...].")
    for site in todo:
        module = modules.pop(site)
        if module.weight.is_meta:
            raise TargetError(f"{site} has no weights yet (meta device); load the model first, or use "
                              "peftkit.quant.load_quantized() to load and quantize in one pass.")
        _replace(raw, site, QuantLinear.from_module(module, spec, dtype))
        del module
    memory.release()
    return model


def quantize_revertibly(model: nn.Module, **options: Any) -> Callable[[], None]:
    """`quantize` (same options), returning what puts the replaced full-precision layers back; they
    stay in memory until that is dropped. If quantizing fails halfway, the layers done are put
    back before the error propagates."""
    raw = _raw(model)
    before = {site: m for site, m in iter_sites(raw) if isinstance(m, LINEAR_TYPES)}

    def revert() -> None:
        now = dict(iter_sites(raw))
        for site, module in before.items():
            if now.get(site) is not module:
                _replace(raw, site, module)

    try:
        quantize(model, **options)
    except BaseException:
        revert()
        raise
    return revert


def base_quantization(method_config: Any = None, scheme: str | None = None) -> dict[str, Any] | None:
    """`quantize` / `load_quantized` options for a run: those a method config declares through a
    ``quantization()`` method (the qlora recipe does), with `scheme` (e.g. ``--quantize``) on top;
    None when neither asks for quantization."""
    declare = getattr(method_config, "quantization", None)
    declared = declare() if callable(declare) else None
    if scheme is None:
        return declared
    return {**(declared or {}), "scheme": scheme}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every `QuantLinear` of the model by site name (also under adapter wrappers)."""
    return {name: m for name, m in iter_sites(_raw(model)) if isinstance(m, QuantLinear)}


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every `QuantLinear` by its full-precision layer (the dequantized weights), in place."""
    raw = _raw(model)
    for site, layer in quantized_layers(raw).items():
        _replace(raw, site, layer.dequantized_module())
    return model


@dataclass
class Footprint:
    """Bytes of the quantized layers' weight storage against the same weights in full precision."""

    layers: int
    weights: int  # weight elements held by quantized layers
    storage_bytes: int
    full_bytes: int  # the same weights in their original dtype
    model_bytes: int  # every parameter and buffer of the model, quantized storage included

    @property
    def bytes_per_param(self) -> float:
        return self.storage_bytes / max(self.weights, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "weights": self.weights, "storage_bytes": self.storage_bytes,
                "full_bytes": self.full_bytes, "bytes_per_param": round(self.bytes_per_param, 5),
                "model_bytes": self.model_bytes}


def footprint(model: nn.Module) -> Footprint:
    """Storage accounting of a quantized model (shared tensors counted once)."""
    raw = _raw(model)
    layers = quantized_layers(raw)
    seen: set[int] = set()
    total = 0
    for tensor in (*raw.parameters(), *raw.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    weights = sum(m.weight_numel for m in layers.values())
    full = sum(m.weight_numel * torch.empty(0, dtype=m.weight_dtype).element_size() for m in layers.values())
    return Footprint(len(layers), weights, sum(m.storage_bytes() for m in layers.values()), full, total)
