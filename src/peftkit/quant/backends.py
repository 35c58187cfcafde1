"""Kernels that turn an (out, in) weight into stored tensors and back.

Both backends produce and read the same tensors (the bitsandbytes layout, see `formats.py`), so a
layer quantized by one can be dequantized by the other:

- ``torch`` — plain PyTorch, any device: one gather per byte, then a per-block multiply
  (benchmarks/quant.py measures its cost against fp32).
- ``bitsandbytes`` — its native 4-bit kernels (faster dequantization on CPU, CUDA kernels on GPUs).
  Double-quantized absmax codes may differ from the torch backend's by one step in a few blocks in a
  thousand: bitsandbytes' CPU kernel rounds values that sit on a midpoint the other way.
  int8 has no faster bitsandbytes path for weight-only use, so it runs on the torch kernels.

Stored tensors: ``qweight`` (packed 4-bit codes, or int8 (out, in)), and ``absmax`` (float32 per
block / per row) or, double-quantized, ``absmax_codes`` (uint8), ``absmax_scale`` (float32 per 256
blocks) and ``absmax_offset`` (float32 scalar).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import ConfigError
from . import formats
from .codes import dynamic_map, table
from .spec import QuantSpec

Tensors = dict[str, torch.Tensor]


def _encode_torch(weight: torch.Tensor, spec: QuantSpec) -> Tensors:
    if not spec.four_bit:
        q, absmax = formats.quantize_int8(weight)
        return {"qweight": q, "absmax": absmax}
    packed, absmax = formats.quantize_4bit(weight, spec.scheme, spec.blocksize)
    return {"qweight": packed, **_absmax_tensors(absmax, spec)}


def _absmax_tensors(absmax: torch.Tensor, spec: QuantSpec) -> Tensors:
    if not spec.double_quant:
        return {"absmax": absmax}
    codes, scale, offset = formats.quantize_absmax(absmax)
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset}


def _absmax(tensors: Tensors) -> torch.Tensor:
    if "absmax_codes" in tensors:
        return formats.dequantize_absmax(tensors["absmax_codes"], tensors["absmax_scale"], tensors["absmax_offset"])
    return tensors["absmax"]


def _decode_torch(tensors: Tensors, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if not spec.four_bit:
        return formats.dequantize_int8(tensors["qweight"], tensors["absmax"], dtype)
    numel = shape[0] * shape[1]
    weight = formats.dequantize_4bit(tensors["qweight"], _absmax(tensors), spec.scheme, spec.blocksize, numel)
    return weight.view(shape) if dtype == torch.float32 else weight.view(shape).to(dtype)


def _bnb() -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("backend='bitsandbytes' needs the bitsandbytes package: `pip install 'peftkit[bnb]'` "
                          "(bitsandbytes>=0.48), or use backend='torch'.")
    import bitsandbytes.functional as bnb_functional

    return bnb_functional


def _encode_bnb(weight: torch.Tensor, spec: QuantSpec) -> Tensors:
    if not spec.four_bit:
        return _encode_torch(weight, spec)
    bf = _bnb()
    packed, state = bf.quantize_4bit(weight.detach().float().contiguous(), blocksize=spec.blocksize,
                                     quant_type=spec.scheme, compress_statistics=spec.double_quant)
    n_blocks = -(-weight.numel() // spec.blocksize)
    qweight = torch.zeros(n_blocks * spec.blocksize // 2, dtype=torch.uint8, device=weight.device)
    qweight[:packed.numel()] = packed.view(-1)  # bitsandbytes stores no padding after a partial block
    if not spec.double_quant:
        return {"qweight": qweight, "absmax": state.absmax.float()}
    return {"qweight": qweight, "absmax_codes": state.absmax, "absmax_scale": state.state2.absmax,
            "absmax_offset": state.offset.reshape(())}


def _decode_bnb(tensors: Tensors, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if not spec.four_bit:
        return _decode_torch(tensors, spec, shape, dtype)
    bf = _bnb()
    device = tensors["qweight"].device
    nested = None
    absmax = tensors.get("absmax")
    if "absmax_codes" in tensors:
        absmax = tensors["absmax_codes"]
        nested = bf.QuantState(absmax=tensors["absmax_scale"], code=dynamic_map(device),
                               blocksize=formats.DQ_BLOCKSIZE, dtype=torch.float32)
    state = bf.QuantState(absmax=absmax, shape=torch.Size(shape), code=table(spec.scheme, device),
                          blocksize=spec.blocksize, quant_type=spec.scheme, dtype=torch.float32,
                          offset=tensors.get("absmax_offset"), state2=nested)
    packed = tensors["qweight"][:-(-shape[0] * shape[1] // 2)].view(-1, 1)
    weight = bf.dequantize_4bit(packed, quant_state=state)
    return weight if dtype == torch.float32 else weight.to(dtype)


_KERNELS = {"torch": (_encode_torch, _decode_torch), "bitsandbytes": (_encode_bnb, _decode_bnb)}


def encode(weight: torch.Tensor, spec: QuantSpec) -> Tensors:
    """The stored tensors of an (out, in) weight."""
    return _KERNELS[spec.backend][0](weight, spec)


def decode(tensors: Tensors, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` from its stored tensors."""
    return _KERNELS[spec.backend][1](tensors, spec, shape, dtype)


def storage_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of the tensors `encode` returns for an (out, in) weight."""
    if not spec.four_bit:
        return {"qweight": (shape, torch.int8), "absmax": ((shape[0],), torch.float32)}
    n_blocks = -(-shape[0] * shape[1] // spec.blocksize)
    layout = {"qweight": ((n_blocks * spec.blocksize // 2,), torch.uint8)}
    if not spec.double_quant:
        return {**layout, "absmax": ((n_blocks,), torch.float32)}
    return {**layout, "absmax_codes": ((n_blocks,), torch.uint8),
            "absmax_scale": ((-(-n_blocks // formats.DQ_BLOCKSIZE),), torch.float32),
            "absmax_offset": ((), torch.float32)}


def check_available(spec: QuantSpec) -> None:
    """Raise a `ConfigError` now (not at the first forward) when the backend cannot run."""
    if spec.backend == "bitsandbytes" and spec.four_bit:
        _bnb()
