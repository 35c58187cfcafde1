"""Method registry: name → (family, config class, builder, optional PEFT-format codec).

Methods register themselves when `peftkit.methods` is imported; the core only ever looks them up.
`peftkit.config("lora", r=8)` and a YAML ``method: lora`` block reach the same place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from .config import MethodConfig, build_config
from .protocol import Delta, ModelDelta

FAMILIES = ("additive", "reparameterized", "partial", "hybrid", "unified")


@dataclass
class Attachment:
    """What a builder returns: deltas per site (keyed by slot), and model-level deltas by slot."""

    sites: dict[str, dict[str, Delta]] = field(default_factory=dict)
    model_deltas: dict[str, ModelDelta] = field(default_factory=dict)

    def add(self, site: str, slot: str, delta: Delta) -> None:
        slots = self.sites.setdefault(site, {})
        key, n = slot, 1
        while key in slots:  # two parts of a composition at one site
            key, n = f"{slot}_{n}", n + 1
        slots[key] = delta

    def extend(self, other: Attachment) -> None:
        for site, slots in other.sites.items():
            for slot, delta in slots.items():
                self.add(site, slot, delta)
        for slot, delta in other.model_deltas.items():
            key, n = slot, 1
            while key in self.model_deltas:
                key, n = f"{slot}_{n}", n + 1
            self.model_deltas[key] = delta


Builder = Callable[[nn.Module, Any], Attachment]


class Controller:
    """Per-adapter training-time logic a method may need (e.g. rank reallocation).

    A trainer calls ``tuned.update(step)`` after each optimizer step and before gradients are
    zeroed; the TunedModel forwards it to the controller of every trainable adapter.
    """

    def update(self, tuned: Any, name: str, step: int) -> None:  # pragma: no cover - default no-op
        return None

    def needs_calibration(self, tuned: Any, name: str) -> bool:
        """Whether adapter `name` must see data (`calibrate`) before it can train or be saved."""
        return False

    def calibrate(self, tuned: Any, name: str, batches: Any, loss_fn: Any = None) -> None:
        """One-off, data-driven set-up before training (e.g. pruning masks scored on a few batches)."""
        return None
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
    # (model, config) -> None: brings the *base* into the form the method needs before `build` runs
    # (e.g. a recipe that quantizes it). Runs on every attach, so it must be idempotent; `build`
    # itself never changes the model.
    prepare: Callable[[nn.Module, Any], None] | None = None
    # Peak learning rate the method's paper (or short-run measurement) recommends; trainers use
    # it when the user gives none. None: the trainer's task default.
    lr: float | None = None
    # Peak rate for a new task head (a classifier), where it should differ from `lr`: methods that
    # leave the features almost unchanged at init wait on the head, which then has to move faster.
    head_lr: float | None = None
    # Options trainers start from (the user's options override them), where a training run is best
    # served by something other than the method's minimal default (e.g. wider placement).
    train_options: dict[str, Any] | None = None
    # Dropout probability trainers give the frozen base model (None: the model's own). A method whose
    # trainable signal reaches the head smaller than the base's dropout noise learns better without it.
    base_dropout: float | None = None
    # Whether trainers fit a *new* task head on the attached, untrained model's features before training
    # (train/probe.py): for methods that move the features too little to wait for a random head to grow.
    probe_head: bool = False


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


def recommended_lr(name: str | None) -> float | None:
    """The registered method's recommended learning rate (None if it has none or is unknown)."""
    spec = _METHODS.get(name) if name else None
    return spec.lr if spec else None


def recommended_head_lr(name: str | None) -> float | None:
    """The registered method's recommended task-head learning rate (None: the same as its lr)."""
    spec = _METHODS.get(name) if name else None
    return spec.head_lr if spec else None


def recommended_base_dropout(name: str | None) -> float | None:
    """The registered method's recommended dropout for the frozen base (None: the model's own)."""
    spec = _METHODS.get(name) if name else None
    return spec.base_dropout if spec else None


def recommended_probe_head(name: str | None) -> bool:
    """Whether the registered method asks trainers to fit a new task head before training."""
    spec = _METHODS.get(name) if name else None
    return bool(spec and spec.probe_head)


def recommended_options(name: str | None) -> dict[str, Any]:
    """Options a trainer starts from for the registered method `name` (empty if none or unknown)."""
    spec = _METHODS.get(name) if name else None
    return dict(spec.train_options or {}) if spec else {}


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


def config(name: str, **options: Any) -> MethodConfig:
    """A validated, frozen config for method `name`; unknown options are rejected with a suggestion."""
    return build_config(get(name).config_cls, options)


def config_from_dict(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """A config from ``{"method": name, **options}`` (the YAML / JSON form)."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a method config needs a 'method' key, got {data!r}")
    return config(data["method"], **{k: v for k, v in data.items() if k != "method"})
