"""The *context* form: extra key/value rows in front of every self-attention, through transformers'
`AttentionInterface`.

Transformers 5 sends every attention computation through ``ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]``. While an adapter with key/value rows runs, the configs of the
model's attention modules name ``"peftkit_kv_prefix:<the implementation they had>"``, registered
here: a function that puts the rows before the module's keys and values, widens the attention mask
so that every query sees them, and calls the original implementation (eager, sdpa, flash), with
that implementation's mask function. A call without rows passes straight through, so the swap is
invisible to anything else, and the name alone says how to undo it.

The rows reach the function in two ways: as a keyword argument of the forward call (transformers
hands it down to the attention function; gradient checkpointing replays it with the layer), and in
a registry held while the call runs (for `generate()`, which refuses unknown keywords). Under
gradient checkpointing the swap outlives the call, so that the backward recomputation routes the
same way; the registry does not, so nothing leaks into later calls.

Why not the cache route (rows as a pre-filled ``cache=``, as PEFT does): transformers drops the
cache under gradient checkpointing, encoders such as DistilBERT take no cache at all, hybrid and
sliding-window caches evict rows, and `generate()` would need its inputs rewritten to account for
the pre-filled cache. This route needs none of that (see benchmarks/additive.py for speed).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError

NAME = "peftkit_kv_prefix"
KWARG = "peftkit_kv_rows"
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


_ACTIVE: list[KeyValueRows] = []  # registry of the calls now running
_USERS: dict[int, tuple[weakref.ref, int]] = {}  # id(config) -> (config, calls holding the route)


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
    return [r for active in _ACTIVE for r in active.by_module.get(id(module), [])]


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


def _route(config: Any) -> None:
    entry = _USERS.get(id(config))
    users = entry[1] if entry is not None and entry[0]() is config else 0
    if not str(config._attn_implementation).startswith(NAME + ":"):  # also after set_attn_implementation
        config._attn_implementation = routed_name(config._attn_implementation)
    _USERS[id(config)] = (weakref.ref(config), users + 1)


def _unroute(config: Any, keep: bool) -> None:
    ref, users = _USERS.pop(id(config))
    if users > 1:
        _USERS[id(config)] = (ref, users - 1)
    elif not keep and str(config._attn_implementation).startswith(NAME + ":"):
        config._attn_implementation = config._attn_implementation.split(":", 1)[1]


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """Self-attention modules inside a block (any that may call the attention function)."""
    return [m for m in block.modules() if "attention" in type(m).__name__.lower()
            and "cross" not in type(m).__name__.lower() and not getattr(m, "is_cross_attention", False)]


def _checkpointing(model: nn.Module) -> bool:
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def routed(model: nn.Module, blocks: Sequence[nn.Module], rows: Sequence[Rows]) -> Iterator[KeyValueRows]:
    """Hold `rows[i]` in front of the keys/values of the attention in `blocks[i]` for one call.
    Yields the `KeyValueRows` to pass as ``kwargs[KWARG]``."""
    by_module: dict[int, list[Rows]] = {}
    configs: dict[int, Any] = {}
    for block, layer_rows in zip(blocks, rows, strict=True):
        for module in attention_modules(block):
            by_module[id(module)] = [layer_rows]
            config = getattr(module, "config", None)
            if config is not None:
                configs[id(config)] = config
    if not configs:
        raise ConfigError(f"{type(model).__name__}'s attention modules have no config to route through "
                          "transformers' AttentionInterface; key/value prefixes need a transformers model.")
    carried = KeyValueRows(by_module)
    for config in configs.values():
        _route(config)
    _ACTIVE.append(carried)
    try:
        yield carried
    finally:
        _ACTIVE.remove(carried)
        keep = _checkpointing(model)
        for config in configs.values():
            _unroute(config, keep)
