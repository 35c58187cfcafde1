"""What a quantized layer stores: the scheme, its options and the kernel backend, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, shown

SCHEMES = ("nf4", "fp4", "int8")
BACKENDS = ("torch", "bitsandbytes")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts too
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(value: Any, option: str = "compute_dtype") -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name ("bfloat16", "fp32", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"{option}={shown(value)} is not a floating dtype; use one of float32, bfloat16, float16 (or None).")


@dataclass(frozen=True)
class QuantSpec:
    """``scheme`` nf4 / fp4 (blockwise 4-bit) or int8 (per output row); ``double_quant`` and
    ``blocksize`` apply to the 4-bit schemes; ``backend`` picks the kernels ("bitsandbytes" needs
    the optional package and accelerates the 4-bit schemes; int8 always runs on the torch kernels)."""

    scheme: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    backend: str = "torch"

    def __post_init__(self) -> None:
        problems = []
        if self.scheme not in SCHEMES:
            problems.append(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.blocksize not in BLOCKSIZES:
            problems.append(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            problems.append(f"double_quant must be True or False, got {self.double_quant!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if problems:
            raise ConfigError("invalid quantization options: " + "; ".join(problems) + ".")

    @property
    def four_bit(self) -> bool:
        return self.scheme in ("nf4", "fp4")

    def describe(self) -> str:
        if not self.four_bit:
            return "int8 per-row"
        return f"{self.scheme} bs{self.blocksize}" + (" +dq" if self.double_quant else "")
