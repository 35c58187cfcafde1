"""Attention whose probability dropout draws `core.dropout`'s mask, for transformers models that run SDPA.

transformers hands the attention-probability dropout to ``scaled_dot_product_attention`` as ``dropout_p``.
On a CPU no fused SDPA kernel takes a dropout, so it falls back to its math path: float32 copies of the
query, key and value, both products in float32, and a ``bernoulli_`` draw per probability: on a BERT-sized
encoder in bfloat16 a large share of a training step (``benchmarks/results/perf.md``).

`attention` is registered with transformers' `AttentionInterface` (and SDPA's mask function with
`AttentionMaskInterface`) under `NAME`. While it trains with dropout on a CPU it computes

    scores = q·kᵀ · scale  (+ mask)        in float32, as SDPA's math path does
    probs  = dropout(softmax(scores))      in the value's dtype, with `core.dropout`'s mask
    out    = probs · v                     in the value's dtype

Everything else — evaluation, no dropout, another device, ``torch.compile``, options it does not handle
(``softcap``, attention sinks, a position bias) — goes to transformers' own SDPA function unchanged, so
outside training the outputs are SDPA's exactly. Fully masked rows get a uniform distribution over their
keys where SDPA returns zeros; such rows are padding, which no loss reads.

`dropout_attention(model)` switches a model from ``"sdpa"`` to `NAME` for the length of a block and back
however the block ends. Models on another implementation, or that cannot switch (transformers' own check, or
a refusal when asked), are left alone: their attention dropout stays SDPA's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import dropout as dropout_masks

NAME = "peftkit_sdpa"
_UNHANDLED = ("softcap", "s_aux", "sinks", "position_bias")


def _sdpa() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, length, head_dim) inputs, returns
    ((batch, length, heads, head_dim), None)."""
    if (not 0 < dropout < 1 or query.device.type != "cpu" or torch.compiler.is_compiling()
            or any(kwargs.get(k) is not None for k in _UNHANDLED)):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if q_len > 1 and attention_mask is None and is_causal:  # SDPA's is_causal: aligned to the upper left
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast("cpu", enabled=False):
        # one pass each to float32 in the contiguous layout, so the product reshapes them without another copy
        query, key = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (query, key))
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # as a bias: no heads, no backward
            attention_mask = torch.zeros(attention_mask.shape, device=scores.device).masked_fill_(
                ~attention_mask, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores.add_(attention_mask) if scores.shape == torch.broadcast_shapes(
                scores.shape, attention_mask.shape) else scores + attention_mask
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(dropout_masks.masked_dropout(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention)
    if NAME not in AttentionMaskInterface._global_mapping:  # without one, transformers would pass no mask at all
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks SDPA gets


def _switchable(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers models in `model` that run SDPA and can change implementation."""
    found: list[nn.Module] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        can_switch = getattr(module, "_can_set_attn_implementation", None)  # transformers' own check, if it has one
        if (getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(module, "set_attn_implementation")
                and callable(can_switch) and can_switch() and not any(module in f.modules() for f in found)):
            found.append(module)
    return found


@contextlib.contextmanager
def dropout_attention(model: nn.Module) -> Iterator[int]:
    """Inside the block every SDPA model in `model` runs `attention`; yields how many were switched."""
    switched: list[nn.Module] = []
    try:
        targets = _switchable(model)
        if targets:
            _register()
        for target in targets:
            try:
                target.set_attn_implementation(NAME)
            except ValueError:  # transformers refuses the name for this model: it keeps SDPA, which is correct
                continue
            switched.append(target)
        yield len(switched)
    finally:
        for target in reversed(switched):
            target.set_attn_implementation("sdpa")
