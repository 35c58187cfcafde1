"""The storage formats as pure tensor functions (plain PyTorch, any device).

4-bit (NF4 / FP4), the bitsandbytes layout: the weight is flattened row-major and cut into blocks
of `blocksize` values; each block stores its absmax and, per value, the index of the nearest code
book entry to ``w / absmax``; two indices per byte, the even element in the high nibble. A last,
partial block is zero-padded (zeros change neither its absmax nor the real values' codes).

Double quantization (QLoRA): the per-block absmax values, minus their mean, are quantized again
to 8 bits (the signed dynamic map) in blocks of 256, each with an fp32 absmax of its own:
``absmax ≈ dynamic[q] · scale[block] + offset``. Cost: 8/64 + 32/(64·256) = 0.127 bit/param
instead of 32/64 = 0.5.

int8: symmetric per output row, ``w ≈ q · absmax_row / 127``.
"""

from __future__ import annotations

import torch

from .codes import dynamic_map, pair_table, sorted_bounds

DQ_BLOCKSIZE = 256
_CHUNK = 1 << 18  # values quantized at once: bounds the temporaries (a few MB) on big layers
_TINY = 1e-38


def _pad_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def _nearest(blocks: torch.Tensor, absmax: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Index (int32) of the sorted code nearest to each ``value / absmax`` of its block."""
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1, 1)
    return torch.bucketize(scaled, bounds, out_int32=True)


@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, kind: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 of ``ceil(n / blocksize) · blocksize / 2`` bytes, absmax float32 per block)."""
    bounds, order = sorted_bounds(kind, weight.device)
    flat = weight.detach().reshape(-1)
    n_blocks = -(-flat.numel() // blocksize)
    packed = torch.empty(n_blocks * blocksize // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=weight.device)
    step = max(1, _CHUNK // blocksize) * blocksize
    for start in range(0, flat.numel(), step):
        blocks = _pad_blocks(flat[start:start + step].float(), blocksize)  # (b, blocksize)
        first = start // blocksize
        block_max = blocks.abs().amax(dim=1)
        absmax[first:first + blocks.shape[0]] = block_max
        codes = order[_nearest(blocks, block_max, bounds)].view(-1)
        packed[first * blocksize // 2:(first + blocks.shape[0]) * blocksize // 2] = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, kind: str, blocksize: int, numel: int) -> torch.Tensor:
    """float32 values (numel,): one gather of two values per byte, then the per-block scale.

    The (256, 2) float32 pair table is gathered as 8-byte words (twice as fast on CPU as gathering rows)."""
    pairs = pair_table(kind, packed.device).view(torch.int64).view(-1)  # (256,) two float32 per word
    values = pairs.index_select(0, packed.int()).view(torch.float32)  # (2 * bytes,)
    values = values.view(-1, blocksize).mul_(absmax.unsqueeze(1))
    return values.view(-1)[:numel]


@torch.no_grad()
def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (codes uint8 (n,), scale float32 per 256, offset float32 ())."""
    offset = absmax.mean()
    centred = absmax - offset
    blocks = _pad_blocks(centred, DQ_BLOCKSIZE)
    scale = blocks.abs().amax(dim=1)
    code = dynamic_map(absmax.device)
    codes = _nearest(blocks, scale, (code[1:] + code[:-1]) / 2).view(-1)[:absmax.numel()]
    return codes.to(torch.uint8), scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    values = dynamic_map(codes.device).index_select(0, codes.int())
    values = _pad_blocks(values, DQ_BLOCKSIZE).mul_(scale.unsqueeze(1)).view(-1)[:codes.numel()]
    return values.add_(offset)


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), absmax float32 (out,)) with ``w ≈ q · absmax / 127`` per row."""
    rows = weight.detach().float()
    absmax = rows.abs().amax(dim=1)
    q = torch.round(rows * (127.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8), absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale = (absmax * (1.0 / 127.0)).unsqueeze(1)
    if dtype == torch.float32:
        return q.float().mul_(scale)
    return (q.float() * scale).to(dtype)
