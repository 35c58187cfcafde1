"""Code books of the 4-bit formats and of the 8-bit double-quantization map.

NF4 (Dettmers et al., QLoRA, 2023, appendix E): the 16 values are quantiles of N(0, 1) normalised
to [-1, 1], with an exact zero: 8 positive values from the quantiles at ``linspace(δ, 1/2, 9)``
and 7 negative ones from ``linspace(δ, 1/2, 8)``, δ = 0.9677083 (the mean of the two outermost
quantiles of a 15- and a 16-level grid). `NF4` holds the float32 values the paper prints (and
bitsandbytes uses); `nf4_from_quantiles()` rebuilds them from that construction.

FP4 is bitsandbytes' 4-bit float (1 sign bit = code bit 3, 2 exponent, 1 mantissa bit), values
``{0, 1/16, 2, 3, 4, 6, 8, 12} / 12`` with the sign, normalised to max 1.

The double-quantization map is bitsandbytes' signed 8-bit "dynamic" map: 0, 1 and, for each
decade 10^(e-6), e = 0..6, 2^e evenly spaced magnitudes in [0.1, 1]·10^(e-6) with both signs.
Using the same maps and rounding makes peftkit's 4-bit storage byte-compatible with bitsandbytes.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import torch

NF4_OFFSET = 0.9677083

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # by the low 3 code bits
FP4 = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(-m / 12.0 for m in _FP4_MAGNITUDES)

TABLES = {"nf4": NF4, "fp4": FP4}


def nf4_from_quantiles(offset: float = NF4_OFFSET) -> list[float]:
    """The NF4 values from the paper's construction (float64), for checking `NF4`."""
    ppf = NormalDist().inv_cdf

    def grid(n: int) -> list[float]:  # n points from `offset` down to 0.5, the last one dropped
        return [offset + (0.5 - offset) * i / (n - 1) for i in range(n - 1)]

    positive = [ppf(p) for p in grid(9)]
    negative = [-ppf(p) for p in grid(8)]
    values = sorted(positive + negative + [0.0])
    top = max(abs(v) for v in values)
    return [v / top for v in values]


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        decade = (10.0 ** (e - 6)) * mids  # float32, as bitsandbytes computes it
        values += decade.tolist() + (-decade).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted values of the signed 8-bit dynamic map."""
    return _dynamic_map_cpu().to(device)


@functools.lru_cache(maxsize=64)
def table(kind: str, device: torch.device) -> torch.Tensor:
    """The 16 values of `kind` ("nf4" / "fp4") as a float32 tensor on `device`."""
    return torch.tensor(TABLES[kind], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def sorted_bounds(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted neighbours, code of each sorted position): nearest-value
    quantization is ``order[bucketize(x, midpoints)]``."""
    values, order = torch.sort(table(kind, device), stable=True)
    return (values[1:] + values[:-1]) / 2, order.to(torch.uint8)


@functools.lru_cache(maxsize=64)
def pair_table(kind: str, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two values one packed byte holds (high nibble first), so a single
    gather dequantizes a whole byte."""
    values = table(kind, device)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte >> 4], values[byte & 15]], dim=1).contiguous()
