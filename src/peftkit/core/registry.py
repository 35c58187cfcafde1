"""Method registry: name → (family, config class, builder, optional PEFT-format codec, recipe).

Methods register themselves when `peftkit.methods` is imported; the core only ever looks them up.
`peftkit.config("lora", r=8)` and a YAML ``method: lora`` block reach the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from .config import MethodConfig, build_config
from .protocol import Controller, Delta, ModelDelta

FAMILIES = ("additive", "reparameterized", "partial", "hybrid", "unified")


@dataclass
class Attachment:
    """What a builder returns: deltas per site (keyed by slot), and model-level deltas by slot."""

    sites: dict[str, dict[str, Delta]] = field(default_factory=dict)
    model_deltas: dict[str, ModelDelta] = field(default_factory=dict)

    def add(self, site: str, slot: str, delta: Delta) -> None:
        slots = self.sites.setdefault(site, {})
        slots[_free_key(slots, slot)] = delta  # two parts of a composition at one site get slot, slot_1, ...

    def extend(self, other: Attachment) -> None:
        for site, slots in other.sites.items():
            for slot, delta in slots.items():
                self.add(site, slot, delta)
        for slot, delta in other.model_deltas.items():
            self.model_deltas[_free_key(self.model_deltas, slot)] = delta


def _free_key(taken: Mapping[str, Any], key: str) -> str:
    name, n = key, 1
    while name in taken:
        name, n = f"{key}_{n}", n + 1
    return name


Builder = Callable[[nn.Module, Any], Attachment]


Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HfCodec:
    """Translation to and from the Hugging Face PEFT on-disk format for one method.

    ``to_hf(config, state, model) -> (adapter_config_dict, tensors)`` and
    ``from_hf(adapter_config_dict, tensors, model) -> (config, state)``, where `state` uses
    peftkit keys (``<site>.<slot>.<tensor>``) and `tensors` full PEFT keys. `module_prefix` is
    what PEFT puts before module paths in this method's files (task-head copies use it too).
    """

    peft_type: str
    to_hf: Callable[[Any, Tensors, nn.Module], tuple[dict[str, Any], Tensors]]
    from_hf: Callable[[dict[str, Any], Tensors, nn.Module], tuple[MethodConfig, Tensors]]
    module_prefix: str = "base_model.model."


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    config_cls: type[MethodConfig]
    build: Builder
    summary: str
    hf: HfCodec | None = None
    identity_at_init: bool = False  # the contract suite checks base outputs are reproduced exactly
    controller: Callable[[Any], Controller] | None = None  # config -> Controller, for training-time logic
    # (model, config) -> undo: brings the *base* into the form the method needs before `build` runs
    # (e.g. a recipe that quantizes it) and returns what puts it back (None: nothing changed), which a
    # failed attach calls. Runs on every attach, so it must be idempotent; `build` itself never
    # changes the model.
    prepare: Callable[[nn.Module, Any], Callable[[], None] | None] | None = None
    # The method's recommended training settings, read by trainers (`peftkit.train.recipes`): keys of
    # `Recipe` (lr, head_lr, options, base_dropout, probe_head). The engine never reads it.
    recipe: Mapping[str, Any] | None = None
    # Why the method cannot train with its model sharded across processes (FSDP), when it cannot:
    # trainers refuse it up front with this reason. None: it shards like any module.
    unshardable: str | None = None


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method. Names are unique; the family must be one of the survey's five."""
    if spec.family not in FAMILIES:
        raise ValueError(f"family {spec.family!r} is not one of {FAMILIES}")
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.config_cls.method != spec.name:
        raise ValueError(f"{spec.config_cls.__name__}.method is {spec.config_cls.method!r}, expected {spec.name!r}")
    _METHODS[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(
            f"unknown method {name!r}.{did_you_mean(name, _METHODS)} Registered methods: {', '.join(sorted(_METHODS))}."
        )
    return _METHODS[name]


def by_peft_type(peft_type: str) -> MethodSpec:
    """The method that reads PEFT adapters of `peft_type`. Recipes may write another method's type
    (qlora writes LORA); reading prefers the method named like the type."""
    found = [s for s in _METHODS.values() if s.hf is not None and s.hf.peft_type == peft_type]
    if found:
        return next((s for s in found if s.name == peft_type.lower()), found[0])
    known = sorted(s.hf.peft_type for s in _METHODS.values() if s.hf)
    raise ConfigError(f"peftkit cannot read PEFT adapters of type {peft_type!r}; it reads {', '.join(known)}.")


def methods(family: str | None = None) -> list[str]:
    """Registered method names (optionally one family), sorted."""
    return sorted(n for n, s in _METHODS.items() if family is None or s.family == family)


def specs() -> list[MethodSpec]:
    return [_METHODS[n] for n in methods()]


def config(method: str | Mapping[str, Any] | MethodConfig, /, **options: Any) -> MethodConfig:
    """A validated, frozen config: ``config("lora", r=8)``, or from the YAML / JSON form
    ``config({"method": "lora", "r": 8})``; a config passed in comes back (with `options` replaced).
    Unknown options are rejected with a suggestion."""
    if isinstance(method, MethodConfig):
        return method.replace(**options) if options else method
    if isinstance(method, Mapping):
        if "method" not in method:
            raise ConfigError(f"a method config needs a 'method' key, got {dict(method)!r}")
        options = {**{k: v for k, v in method.items() if k != "method"}, **options}
        method = method["method"]
    if not isinstance(method, str):
        raise ConfigError(f"peftkit.config takes a method name such as 'lora', got {type(method).__name__} "
                          f"{method!r}. Registered methods: {', '.join(methods())}.")
    return build_config(get(method).config_cls, options)
