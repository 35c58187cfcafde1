"""Numeric precision of a run: ``--precision fp32 | bf16 | fp16 | auto``.

- ``bf16``: the frozen base's weights are stored in bfloat16 (half their memory) and forward and
  backward run under bfloat16 autocast; adapters, new task heads and the optimizer stay float32
  (a half-precision base gives float32 deltas, `core.linear.delta_dtype`).
- ``fp16``: float16 autocast over a float32 base, with gradient scaling — CUDA only.
- ``auto``: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AMX or
  AVX-512 BF16), else fp32. Elsewhere bf16 is emulated and slower than fp32 by an order of magnitude,
  so asking for it there is refused. ``PEFTKIT_AUTO_PRECISION=fp32`` in the environment makes ``auto`` mean
  fp32 everywhere: results that compare bit for bit across machines (the test suite sets it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return False


def resolve(precision: str, device: torch.device) -> str:
    """`precision` with ``auto`` decided for `device`; refuses what the device cannot do well."""
    if precision == "auto":
        pinned = os.environ.get("PEFTKIT_AUTO_PRECISION")
        if pinned not in (None, "", "fp32"):
            raise ConfigError(f"PEFTKIT_AUTO_PRECISION={pinned!r}: the only value it takes is fp32 (auto means fp32); "
                              "unset it, or pass --precision to choose one")
        if pinned == "fp32":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        raise ConfigError(f"--precision bf16: this {device.type.upper()} has no native bfloat16 arithmetic (AMX or "
                          "AVX-512 BF16 on a CPU, Ampere or newer on a GPU), so bf16 would run many times slower "
                          "than fp32; use --precision fp32 (or auto).")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU (float16 on a CPU is emulated); use --precision fp32 "
                          "(or bf16 on a CPU that has it).")
    return precision


def base_dtype(precision: str) -> torch.dtype | None:
    """The dtype to load the frozen base in (None: as stored)."""
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Forward (and so backward) under the run's autocast; nothing for fp32."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaling (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
