"""Quantized bases: NF4 / FP4 (with double quantization) and int8 storage for frozen linear layers.

    import peftkit
    peftkit.quantize(model, "nf4")                        # in place: linear layers → QuantLinear
    tuned = peftkit.attach(model, peftkit.config("lora", targets="all-linear"))
    model = peftkit.quant.load_quantized("path/to/hf-folder", "nf4")   # layer by layer, low peak RSS

Adapters train in full precision on top of the quantized layers (the QLoRA recipe is the
registered method ``qlora``). Merging into a quantized base re-quantizes it and warns with the
error that adds; ``tuned.merge(dequantize=True)`` merges into full-precision copies instead.
"""

from __future__ import annotations

from ..errors import QuantizedMergeWarning
from .apply import Footprint, base_quantization, dequantize, footprint, quantize, quantized_layers
from .codes import FP4, NF4, nf4_from_quantiles
from .linear import QuantLinear
from .loading import load_quantized
from .spec import BACKENDS, SCHEMES, QuantSpec

__all__ = ["BACKENDS", "FP4", "NF4", "SCHEMES", "Footprint", "QuantLinear", "QuantSpec", "QuantizedMergeWarning",
           "base_quantization", "dequantize", "footprint", "load_quantized", "nf4_from_quantiles", "quantize",
           "quantized_layers"]
