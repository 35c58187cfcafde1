"""Composition: one adapter made of several methods at once, each part optionally gated.

Reference: He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning"
(ICLR 2022) — methods are modifications at sites, so they combine by running side by side;
UniPELT (Mao et al., ACL 2022) adds a learned gate per part.
Formula: at a site with parts i, ``y = T_out(base(T_in(x); θ') + Σ_i g_i·Δ_i(x))`` — each part keeps
its own form (see `core/host.py` for the order), ``g_i`` = 1 or a learned gate (`gate.py`).

Options: ``parts`` — method configs, given as ``peftkit.config(...)`` objects or as dicts
``{"method": ..., **options}`` (the YAML form); ``gates`` — ``False`` (default), ``True`` (every
part) or one bool per part. Each part is built by its own method, unchanged; the parts' deltas
are merged into one adapter (colliding slot names get a ``_1``, ``_2`` suffix). The outer
``trainable_modules`` decides the task head; the parts' own ``trainable_modules`` are ignored.
Parts may not both tune the same parameter of the same site (select form): that is an error.
A gated part gates each of its deltas that `gate.py` can gate and leaves its select-form deltas
as they are; a part with model-level deltas (prefixes) or nothing gateable cannot be gated.

Identity at init, mergeability and mixed-batch support are those of the parts: the adapter
merges only if every delta does, and model-level parts (prefixes, virtual tokens) rule out
mixed-adapter batches. Controllers of the parts (e.g. rank or mask schedules) all run, and so do
the parts' base preparations (``qlora`` quantizes the base before anything is built).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import MethodConfig, check
from ...core.protocol import Controller
from ...core.registry import Attachment, MethodSpec, register
from ...core.registry import config as make_config
from ...core.registry import get as get_spec
from ...core.targets import base_at
from ...errors import ConfigError, PeftkitError, shown
from .gate import GATEABLE, GatedDelta


@dataclass(frozen=True)
class ComposeConfig(MethodConfig):
    """Options of ``compose``: `parts` (configs or dicts), `gates` (bool or one bool per part)."""

    method = "compose"
    parts: Sequence[Any] = ()
    gates: bool | Sequence[bool] = False

    def __post_init__(self) -> None:
        parts, errors = [], []
        for i, part in enumerate(self.parts if isinstance(self.parts, list | tuple) else [self.parts]):
            try:
                parts.append(make_config(part))
            except PeftkitError as err:
                errors.append(f"part {i}: {err}")
        if errors:
            raise ConfigError("invalid 'compose' parts: " + "; ".join(errors))
        object.__setattr__(self, "parts", tuple(parts))
        super().__post_init__()

    def problems(self) -> Iterable[str]:
        yield from check(len(self.parts) >= 1, "compose needs parts=[config, ...] (at least one method)")
        gates = self.gates
        if not isinstance(gates, bool):
            yield from check(isinstance(gates, tuple) and len(gates) == len(self.parts)
                             and all(isinstance(g, bool) for g in gates),
                             f"gates must be true/false or one bool per part ({len(self.parts)}), got {shown(gates)}")

    def gate_flags(self) -> tuple[bool, ...]:
        return (self.gates,) * len(self.parts) if isinstance(self.gates, bool) else tuple(self.gates)


def _gated(model: nn.Module, attachment: Attachment, index: int, part: MethodConfig) -> Attachment:
    """Every gateable delta of the part behind its own gate; select-form deltas (e.g. the norms a
    Houlsby adapter trains) and deltas without parameters (input taps) stay as they are. A part with
    nothing gateable is an error."""
    where = f"part {index} ({part.method})"
    if attachment.model_deltas:
        slots = ", ".join(attachment.model_deltas)
        raise ConfigError(f"{where} has model-level deltas ({slots}: virtual tokens or prefixes), which cannot "
                          "be gated; set its gate to false.")
    gated, count = Attachment(), 0
    for site, slots in attachment.sites.items():
        base = base_at(model, site)
        for slot, delta in slots.items():
            if delta.hooks and delta.hooks <= GATEABLE and any(True for _ in delta.trainable_parameters()):
                delta, count = GatedDelta(delta, base, model, where=f" ({where} at {site})"), count + 1
            gated.add(site, slot, delta)
    if not count:
        raise ConfigError(f"{where} has no delta that can be gated (select form only: it sets parameters, which "
                          "cannot take a per-token gate); set its gate to false.")
    return gated


def _check_overrides(model: nn.Module, attachment: Attachment) -> None:
    """Refuse two parts tuning the same parameter of one site (their values would not add up)."""
    for site, slots in attachment.sites.items():
        seen: dict[str, str] = {}
        base = base_at(model, site)
        for slot, delta in slots.items():
            if "param_overrides" not in delta.hooks:
                continue
            for param in delta.param_overrides(base):
                if param in seen:
                    raise ConfigError(f"parts {seen[param]!r} and {slot!r} both tune parameter {param!r} of {site}; "
                                      "narrow one part's targets/layers/exclude so they do not overlap.")
                seen[param] = slot


def build(model: nn.Module, config: ComposeConfig) -> Attachment:
    attachment = Attachment()
    for index, (part, gated) in enumerate(zip(config.parts, config.gate_flags(), strict=True)):
        sub = get_spec(part.method).build(model, part)
        attachment.extend(_gated(model, sub, index, part) if gated else sub)
    _check_overrides(model, attachment)
    for site, slots in attachment.sites.items():
        # select-form deltas first: a merge folds slots in order, and a copy must land before a shift adds to it
        attachment.sites[site] = dict(sorted(slots.items(), key=lambda kv: "param_overrides" not in kv[1].hooks))
    return attachment


def prepare(model: nn.Module, config: ComposeConfig) -> Callable[[], None]:
    """Run each part's base preparation (e.g. ``qlora`` quantizing the base) before any part builds;
    returns what reverts them all (a failing part reverts those before it here)."""
    undos = []

    def revert() -> None:
        for undo in reversed(undos):
            undo()

    try:
        for part in config.parts:
            spec = get_spec(part.method)
            undo = spec.prepare(model, part) if spec.prepare is not None else None
            if undo is not None:
                undos.append(undo)
    except BaseException:
        revert()
        raise
    return revert


class CompositeController(Controller):
    """Runs every part's controller; each sees the whole adapter and acts on its own deltas."""

    def __init__(self, controllers: list[Controller]) -> None:
        self.controllers = controllers

    def update(self, tuned: Any, name: str, step: int) -> None:
        for controller in self.controllers:
            controller.update(tuned, name, step)

    def needs_calibration(self, tuned: Any, name: str) -> bool:
        return any(c.needs_calibration(tuned, name) for c in self.controllers)

    def calibrate(self, tuned: Any, name: str, batches: Any, loss_fn: Any = None) -> None:
        for controller in self.controllers:
            if controller.needs_calibration(tuned, name):
                controller.calibrate(tuned, name, batches, loss_fn)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, c in enumerate(self.controllers) for k, v in c.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, controller in enumerate(self.controllers):
            controller.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})


def controller(config: ComposeConfig) -> Controller:
    specs = [get_spec(part.method) for part in config.parts]
    return CompositeController([s.controller(p) for s, p in zip(specs, config.parts, strict=True) if s.controller])


register(MethodSpec(
    name="compose",
    family="hybrid",
    config_cls=ComposeConfig,
    build=build,
    prepare=prepare,
    summary="Several methods in one adapter (configs or dicts), each part optionally behind a learned gate.",
    controller=controller,
))
