"""The *input* form: virtual token embeddings put before the input embeddings.

Used by prompt tuning and P-tuning, which differ only in how the (k, d) table is learned
(`table.LearnedTable`). For a forward call with k virtual tokens and L real ones:

    inputs_embeds  = [prompt (k) | embed(input_ids) (L)]
    attention_mask = [1 … 1 | mask];  token_type_ids = [0 … 0 | ids]
    position_ids   = [0 … k-1 | position_ids + k]   (shifted; only when given)
                   = [0 … 0   | position_ids]       (unshifted; made when not given)
    labels         = [-100 … | labels]              (token-level labels only)

Shifted (``shift_positions=True``, PEFT's layout, the default on decoders): the prompt reads as text
before the input. Unshifted (the default on bidirectional encoders where a method's option is None):
the real tokens keep their positions, so BERT's [CLS] stays where it was pre-trained, and a virtual
token's own position embedding is a constant its learned vector absorbs.

Outputs of length k + L (logits, hidden states) are cut back to the L real positions. When the
call continues from a cache that already holds the virtual tokens, nothing is injected again.
`generate()` gets placeholder ids plus the embeddings for the prefill step only; the placeholders
are removed from the returned sequences.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .. import arch
from ..protocol import ModelDelta
from .table import LearnedTable

IGNORE_INDEX = -100


def cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the cache passed to this call (0 without one)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    getter = getattr(cache, "get_seq_length", None)
    return int(getter()) if callable(getter) else 0


def shifts_positions(model: nn.Module, setting: bool | None) -> bool:
    """A method's ``shift_positions`` option resolved: None means shift on decoders (causal
    attention) and keep the real tokens' positions on bidirectional encoders."""
    return arch.causal_attention(model) if setting is None else bool(setting)


def require_position_ids(model: nn.Module) -> None:
    """Raise unless `model.forward` takes ``position_ids`` (needed to place the real tokens)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{type(model).__name__}.forward takes no position_ids, so peftkit cannot place the real "
                          "tokens around the virtual ones; set shift_positions to the other value.")


def input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if callable(getter) else None
    if embed is None:
        raise ConfigError(f"{type(model).__name__} has no get_input_embeddings(); virtual tokens need a model "
                          "that takes inputs_embeds (a transformers model).")
    return embed


def placeholder_id(model: nn.Module) -> int:
    """A token id to stand in for virtual tokens in `generate()` sequences (removed afterwards)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0


def _embed(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is not None:
        return embeds
    getter = getattr(model, "get_input_embeddings", None)
    if ids is None or not callable(getter) or getter() is None:
        raise ConfigError("virtual tokens need input_ids (or inputs_embeds) and a model with get_input_embeddings(); "
                          f"{type(model).__name__} call got {sorted(kwargs)}.")
    return getter()(ids)


def _prefixed(value: torch.Tensor, k: int, fill: int | float) -> torch.Tensor:
    head = torch.full((value.shape[0], k), fill, dtype=value.dtype, device=value.device)
    return torch.cat([head, value], dim=1)


class VirtualTokens(ModelDelta):
    """k learned embeddings prepended to the model's input embeddings (see the module docstring)."""

    form = "input"

    def __init__(self, table: LearnedTable, placeholder_id: int, shift_positions: bool = True) -> None:
        super().__init__()
        self.table = table
        self.placeholder_id = placeholder_id
        self.shift_positions = shift_positions
        self.num_tokens = int(table.export().shape[0])
        self._lengths: list[int] = []  # sequence length after each pending prepare (for finish)
        self._generated: list[int] = []

    @classmethod
    def for_model(cls, model: nn.Module, table: LearnedTable, shift_positions: bool | None) -> VirtualTokens:
        """Virtual tokens from `table` for `model`, a method's ``shift_positions`` option resolved."""
        return cls(table, placeholder_id(model), shifts_positions(model, shift_positions))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"values": self.table.export()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.table.replace(state["values"])

    @contextlib.contextmanager
    def running(self, model: nn.Module) -> Iterator[None]:
        self._lengths.clear()  # left over only by a call that raised between prepare and finish
        self._generated.clear()
        yield

    def _inject(self, model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        kwargs = dict(kwargs)
        ids = kwargs.get("input_ids")
        embeds = _embed(model, kwargs)
        k, (batch, length) = self.num_tokens, embeds.shape[:2]
        prompt = self.table().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, k, D)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prefixed(kwargs["token_type_ids"], k, 0)
        pos = kwargs.get("position_ids")
        if pos is None and not self.shift_positions:  # the model's own numbering would shift them
            require_position_ids(model)
            pos = torch.arange(length, device=embeds.device).expand(batch, -1)
        if pos is not None:
            head = torch.arange(k, device=pos.device, dtype=pos.dtype) * int(self.shift_positions)
            real = pos + k if self.shift_positions else pos
            kwargs["position_ids"] = torch.cat([head.expand(*pos.shape[:-1], k), real], dim=-1)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            kwargs["labels"] = _prefixed(labels, k, IGNORE_INDEX)
        return kwargs, ids

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        if cache_length(kwargs) > 0:  # the virtual tokens are already in the cache
            kwargs = dict(kwargs)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _prefixed(kwargs["attention_mask"], self.num_tokens, 1)
            self._lengths.append(-1)
            return kwargs
        kwargs, _ = self._inject(model, kwargs)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _prefixed(kwargs["attention_mask"], self.num_tokens, 1)
        self._lengths.append(kwargs["inputs_embeds"].shape[1])
        return kwargs

    def finish(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        length = self._lengths.pop() if self._lengths else -1
        if length < 0:
            return outputs
        cut = self.num_tokens

        def strip(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[1] == length:
                return value[:, cut:]
            if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                return tuple(strip(v) for v in value)
            return value

        if isinstance(outputs, torch.Tensor):
            return strip(outputs)
        if isinstance(outputs, dict):
            for key in list(outputs.keys()):
                if "attention" not in key and "cache" not in key and "past" not in key:
                    outputs[key] = strip(outputs[key])
        return outputs

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self.shift_positions:
            raise ConfigError("generate() continues positions after the virtual tokens; attach with "
                              "shift_positions=True (the default on decoders) to generate.")
        mask = kwargs.get("attention_mask")
        kwargs, ids = self._inject(model, kwargs)
        embeds = kwargs["inputs_embeds"]
        batch, total = embeds.shape[:2]
        if mask is None:  # generate() would otherwise infer a mask that hides the placeholders
            mask = torch.ones(batch, total - self.num_tokens, dtype=torch.long, device=embeds.device)
        kwargs["attention_mask"] = _prefixed(mask, self.num_tokens, 1)
        if ids is not None:
            kwargs["input_ids"] = _prefixed(ids, self.num_tokens, self.placeholder_id)
        self._generated.append(self.num_tokens if ids is not None else 0)
        return kwargs

    def finish_generate(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        cut = self._generated.pop() if self._generated else 0
        if not cut:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs[:, cut:]
        if getattr(outputs, "sequences", None) is not None:
            outputs.sequences = outputs.sequences[:, cut:]
        return outputs
