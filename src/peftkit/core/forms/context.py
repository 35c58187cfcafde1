"""The *context* form: extra key/value rows in front of every self-attention (prefix tuning).

Transformers 5 sends every attention computation through ``ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]``. While a `KeyValuePrefix` runs, the configs of the model's attention
modules name ``"peftkit_kv_prefix:<the implementation they had>"``, registered with transformers'
`AttentionInterface`: a function that puts the rows before the module's keys and values, widens the
attention mask so that every query sees them, and calls the original implementation (eager, sdpa,
flash) with that implementation's mask function. A call without rows passes straight through, and
the name alone says how to undo the swap, which is undone when the call returns.

The rows reach the function in two ways: as a keyword argument of the forward call (transformers
hands it down to the attention function, and gradient checkpointing replays it with the layer), and
as an attribute of each attention module held only while the call runs (for `generate()`, which
refuses unknown keywords). Under gradient checkpointing the swap outlives the call, so that the
backward recomputation routes the same way; the attribute does not, so nothing leaks into later
calls. The state lives on the model and in the call, never in this module.

Why not the cache route (rows as a pre-filled ``cache=``, as PEFT does): transformers drops the
cache under gradient checkpointing, encoders such as DistilBERT take no cache at all, hybrid and
sliding-window caches evict rows, and `generate()` would need its inputs rewritten to account for
the pre-filled cache. This route needs none of that.

Layout of the table (one row per virtual token): ``[layer0 K (H_kv×hd) | layer0 V | layer1 K | …]``,
PEFT's ``prompt_embeddings`` layout. On decoders the real tokens take positions l, l+1, … after an
l-row prefix (``shift_positions``), as when the prefix is a pre-filled cache.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..protocol import ModelDelta
from .input import cache_length, require_position_ids
from .table import LearnedTable

NAME = "peftkit_kv_prefix"
KWARG = "peftkit_kv_rows"
HELD = "_peftkit_kv_rows"  # attribute of an attention module while a call holds rows for it
Rows = tuple[torch.Tensor, torch.Tensor]  # keys, values: each (kv_heads, rows, head_dim)


class KeyValueRows:
    """Rows per attention module (by identity), as carried in a forward call's keyword arguments."""

    def __init__(self, by_module: dict[int, list[Rows]] | None = None) -> None:
        self.by_module: dict[int, list[Rows]] = by_module or {}

    def merged(self, other: KeyValueRows | None) -> KeyValueRows:
        if other is None:
            return self
        out = {k: list(v) for k, v in other.by_module.items()}
        for key, rows in self.by_module.items():
            out.setdefault(key, []).extend(rows)
        return KeyValueRows(out)



def routed_name(original: str | None) -> str:
    """The implementation name that routes through prefixes and then `original` (registered here)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    original = original or "eager"
    name = f"{NAME}:{original}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, functools.partial(prefixed_attention, original=original))
        AttentionMaskInterface.register(name, functools.partial(_mask_function, original=original))
    return name


def _original_function(module: nn.Module, name: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if eager is None:
        raise ConfigError(f"cannot find the eager attention of {type(module).__name__}; load the model with "
                          "attn_implementation='sdpa' to use key/value prefixes.")
    return eager


def _causal_mask(module: nn.Module, query: torch.Tensor, key: torch.Tensor, name: str,
                 kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The mask the implementation would have implied by passing None (causal or nothing)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    q_len, k_len = query.shape[2], key.shape[2]
    if not causal or q_len == 1 or name.startswith("flash"):
        return None  # flash aligns causal masks bottom-right by itself
    rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    allowed = (rows >= torch.arange(k_len, device=query.device)[None, :]).view(1, 1, q_len, k_len)
    if name == "eager":
        return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)
    return allowed


def _widen(mask: torch.Tensor, extra: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"key/value prefixes cannot extend a {type(mask).__name__} attention mask (flex "
                          "attention); load the model with attn_implementation='sdpa' or 'eager'.")
    if mask.dtype == torch.bool or mask.dim() == 2:  # boolean masks and 2-D padding masks: 1 = attend
        head = torch.ones(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    else:  # additive float masks: 0 = attend
        head = torch.zeros(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    return torch.cat([head, mask], dim=-1)


def _rows_for(module: nn.Module, carried: KeyValueRows | None) -> list[Rows]:
    if carried is not None:
        return carried.by_module.get(id(module), [])
    return list(getattr(module, HELD, ()))


def prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, *, original: str, **kwargs: Any) -> Any:
    """The registered attention function: rows in front of key/value, then the `original` one."""
    rows = _rows_for(module, kwargs.pop(KWARG, None))
    if rows:
        batch = key.shape[0]
        keys = torch.cat([k for k, _ in rows], dim=1)  # (H_kv, P, D)
        values = torch.cat([v for _, v in rows], dim=1)
        if keys.shape[0] != key.shape[1] or keys.shape[2] != key.shape[3]:
            raise ConfigError(f"prefix rows have {keys.shape[0]} heads of size {keys.shape[2]} but "
                              f"{type(module).__name__} uses {key.shape[1]} of size {key.shape[3]}; "
                              "set num_kv_heads=... and head_dim=... to match the model.")
        if attention_mask is None:
            attention_mask = _causal_mask(module, query, key, original, kwargs)
        if attention_mask is not None:
            attention_mask = _widen(attention_mask, keys.shape[1])
        key = torch.cat([keys.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([values.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    return _original_function(module, original)(module, query, key, value, attention_mask, **kwargs)


def _mask_function(*args: Any, original: str, **kwargs: Any) -> Any:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if original not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None  # what transformers does for an implementation without a mask function
    return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, **kwargs)


def route(config: Any) -> bool:
    """Point `config`'s attention at the prefixed implementation; False if it already was."""
    if str(config._attn_implementation).startswith(NAME + ":"):  # also after set_attn_implementation
        return False
    config._attn_implementation = routed_name(config._attn_implementation)
    return True


def unroute(config: Any) -> None:
    """Restore the implementation `route` replaced (read back from the routed name)."""
    if str(config._attn_implementation).startswith(NAME + ":"):
        config._attn_implementation = config._attn_implementation.split(":", 1)[1]


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """Self-attention modules inside a block (any that may call the attention function)."""
    return [m for m in block.modules() if "attention" in type(m).__name__.lower()
            and "cross" not in type(m).__name__.lower() and not getattr(m, "is_cross_attention", False)]


def _checkpointing(model: nn.Module) -> bool:
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class KeyValuePrefix(ModelDelta):
    """Key/value rows, from a learned (l, 2·L·H_kv·hd) table, for the self-attention of `blocks`."""

    form = "context"

    def __init__(self, table: LearnedTable, blocks: list[str], kv_heads: int, head_dim: int,
                 shift_positions: bool) -> None:
        super().__init__()
        self.table = table
        self.blocks = blocks
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.num_tokens = int(table.export().shape[0])
        self.shift_positions = shift_positions
        self._carried: list[KeyValueRows] = []  # one per call now running (nested calls stack)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"values": self.table.export()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.table.replace(state["values"])

    def rows(self) -> list[Rows]:
        """(keys, values) per block, each (H_kv, l, hd)."""
        n, layers = self.num_tokens, len(self.blocks)
        kv = self.table().view(n, 2 * layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2L, H, l, hd)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def _attention(self, model: nn.Module) -> tuple[list[list[nn.Module]], list[Any]]:
        """The attention modules of each block, and the configs they read their implementation from."""
        modules = [attention_modules(model.get_submodule(name)) for name in self.blocks]
        configs = {id(c): c for group in modules for m in group if (c := getattr(m, "config", None)) is not None}
        if not configs:
            raise ConfigError(f"{type(model).__name__}'s attention modules have no config to route through "
                              "transformers' AttentionInterface; key/value prefixes need a transformers model.")
        return modules, list(configs.values())

    @contextlib.contextmanager
    def running(self, model: nn.Module) -> Iterator[None]:
        modules, configs = self._attention(model)
        pairs = [(m, layer_rows) for group, layer_rows in zip(modules, self.rows(), strict=True) for m in group]
        carried = KeyValueRows({id(m): [layer_rows] for m, layer_rows in pairs})
        for config in configs:
            route(config)
        for module, layer_rows in pairs:
            module.__dict__.setdefault(HELD, []).append(layer_rows)
        self._carried.append(carried)
        try:
            yield
        finally:
            self._carried.remove(carried)
            for module, layer_rows in pairs:
                held = module.__dict__[HELD]
                del held[next(i for i, r in enumerate(held) if r is layer_rows)]
                if not held:
                    del module.__dict__[HELD]
            if not _checkpointing(model):  # the backward recomputation must route the same way
                for config in configs:
                    unroute(config)

    def release(self, model: nn.Module) -> None:
        for config in self._attention(model)[1]:
            unroute(config)

    def _shifted(self, model: nn.Module, kwargs: dict[str, Any], positions: torch.Tensor | None) -> dict[str, Any]:
        if not self.shift_positions:
            return kwargs
        require_position_ids(model)
        if positions is None:
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids") if embeds is None else embeds[..., 0]
            if ids is None:
                return kwargs
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1) + cache_length(kwargs)
        return {**kwargs, "position_ids": positions + self.num_tokens}

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = self._shifted(model, dict(kwargs), kwargs.get("position_ids"))
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
        if self._carried and takes_any:  # travels with the call, so gradient checkpointing replays it
            kwargs[KWARG] = self._carried[-1].merged(kwargs.get(KWARG))
        return kwargs

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is None and mask is not None and mask.dim() == 2:  # generate()'s own rule, then shifted
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return self._shifted(model, dict(kwargs), positions)
