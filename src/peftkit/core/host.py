"""The site wrapper: keeps the original module and composes the active adapters' deltas around it.

A `Delta` is one adapter's trainable change at one site. It implements any of four hooks, and
its *form* is simply which hooks it fills in (see DESIGN.md):

    h = transform_input(x)                      # scale form on the input  (IA3 on FFN-down)
    y = base(h)  with param_overrides()         # select form              (BitFit, head copies)
    y = y + weight * contribution(h, base, y)   # reparam / parallel form  (LoRA, parallel adapter;
                                                #   `add_to` may fuse the addition)
    y = transform_output(y)                     # sequential / scale form  (bottleneck adapter, IA3)

The `Delta` protocol lives in `protocol.py`; the deltas the engine owns (the select form) and the
model-level forms are in `forms/`. The host never names a method. Merge state is derived from the
list of merged adapter names; `forward` never merges or unmerges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import AdapterStateError, NotMergeableError
from .linear import LINEAR_TYPES, dense_copy, is_quantized, linear_weight, store_dense
from .protocol import Delta


@dataclass
class SiteContext:
    """What every host reads at forward time; owned and set by the TunedModel."""

    active: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    disabled: bool = False
    routing: tuple[tuple[str | None, tuple[int, ...]], ...] | None = None
    routing_batch: int = 0

    def route(self, per_sample: Sequence[str | None] | None) -> None:
        if per_sample is None:
            self.routing, self.routing_batch = None, 0
            return
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(per_sample):
            groups.setdefault(name, []).append(row)
        self.routing = tuple((name, tuple(rows)) for name, rows in groups.items())
        self.routing_batch = len(per_sample)


def _private_output(layer: nn.Module) -> bool:
    """Whether `layer`'s output is seen by no one but its host: a plain linear layer (its product keeps its
    inputs for backward, never its output) with no forward hooks that could have kept it."""
    return (type(layer) in LINEAR_TYPES and not layer._forward_hooks
            and not torch.nn.modules.module._global_forward_hooks)


def _first(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _with_first(y: Any, value: torch.Tensor) -> Any:
    return (value, *y[1:]) if isinstance(y, tuple) else value


class Host(nn.Module):
    """Wraps one site's module as `base_layer`; holds deltas as `deltas[adapter][slot]`."""

    def __init__(self, base_layer: nn.Module, context: SiteContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        object.__setattr__(self, "context", context)  # shared with every host; not a submodule
        self._merged: list[str] = []
        self._backup: dict[str, torch.Tensor] | None = None
        self._tied: dict[str, nn.Parameter] = {}
        self.requantization_error: float | None = None  # max |ΔW| the last merge into a quantized base added

    # -- bookkeeping -------------------------------------------------------------------------
    def add(self, adapter: str, slot: str, delta: Delta) -> None:
        if adapter not in self.deltas:
            self.deltas[adapter] = nn.ModuleDict()
        if slot in self.deltas[adapter]:
            raise AdapterStateError(f"adapter {adapter!r} already has a {slot!r} delta at this site.")
        self.deltas[adapter][slot] = delta

    def remove(self, adapter: str) -> None:
        if adapter in self._merged:
            raise AdapterStateError(f"adapter {adapter!r} is merged here; unmerge before deleting it.")
        if adapter in self.deltas:
            del self.deltas[adapter]

    def adapters(self) -> list[str]:
        return list(self.deltas.keys())

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._merged)

    @property
    def merged(self) -> bool:
        return bool(self._merged)

    def original_state(self) -> dict[str, torch.Tensor]:
        """The base layer's tensors as they were before any merge."""
        return self._backup if self._backup is not None else dict(self.base_layer.state_dict())

    def _stack(self, names: Iterable[str | None]) -> list[tuple[Delta, float]]:
        weights = self.context.weights
        stack = []
        for name in names:
            if name is None or name not in self.deltas or name in self._merged:
                continue
            weight = weights.get(name, 1.0)
            stack.extend((delta, weight) for delta in self.deltas[name].values())
        return stack

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = self.context
        if ctx.disabled:
            return self.base_layer(x, *args, **kwargs)
        if ctx.routing is not None:
            return self._routed(x, args, kwargs)
        return self._run(self._stack(ctx.active), x, args, kwargs)

    def _run(self, stack: list[tuple[Delta, float]], x: Any, args: tuple, kwargs: dict) -> Any:
        if not stack:
            return self.base_layer(x, *args, **kwargs)
        h, overrides = x, {}
        for delta, _ in stack:
            if "transform_input" in delta.hooks:
                h = delta.transform_input(h)
            if "param_overrides" in delta.hooks:
                overrides.update(delta.param_overrides(self.base_layer))
        if overrides:
            y = functional_call(self.base_layer, overrides, (h, *args), kwargs, strict=False)
        else:
            y = self.base_layer(h, *args, **kwargs)
        out = base_out = _first(y)
        adding = sum("contribution" in delta.hooks for delta, _ in stack)
        overwrite = adding == 1 and _private_output(self.base_layer)
        for delta, weight in stack:
            if "contribution" not in delta.hooks:
                continue
            if weight == 1.0:
                out = delta.add_to(out, h, self.base_layer, base_out, overwrite=overwrite)
            else:
                out = out + weight * delta.contribution(h, self.base_layer, base_out).to(out.dtype)
        for delta, _ in stack:
            if "transform_output" in delta.hooks:
                out = delta.transform_output(out)
        return _with_first(y, out)

    def _routed(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """Mixed-adapter batch: each group of rows runs with its own adapter (None = bare base)."""
        ctx = self.context
        groups = ctx.routing
        batch = x.shape[0]
        if batch == 1 < ctx.routing_batch:  # an input every row shares (position ids): each row gets its adapter's output
            x = x.expand(ctx.routing_batch, *x.shape[1:])
            batch = ctx.routing_batch
        if batch != ctx.routing_batch:
            if batch % ctx.routing_batch:
                raise AdapterStateError(
                    f"adapter_names has {ctx.routing_batch} entries but the batch has {batch} rows; "
                    "give one adapter name (or None) per sample."
                )
            repeat = batch // ctx.routing_batch  # generate() expands rows for beams / return sequences
            groups = tuple((n, tuple(r * repeat + k for r in rows for k in range(repeat))) for n, rows in groups)
        if len(groups) == 1:
            return self._run(self._stack((groups[0][0],)), x, args, kwargs)
        if args or kwargs:
            raise AdapterStateError(f"mixed-adapter batches are not supported at a {type(self.base_layer).__name__} site.")
        out = None
        for name, rows in groups:
            index = torch.tensor(rows, device=x.device)
            part = self._run(self._stack((name,)), x.index_select(0, index), (), {})
            if out is None:
                out = part.new_empty((batch, *part.shape[1:]))
            out[index] = part
        return out

    # -- merging -----------------------------------------------------------------------------
    def check_mergeable(self, names: Sequence[str]) -> None:
        """Raise `NotMergeableError` if any delta of `names` here has no weight equivalent."""
        for name in names:
            for slot, delta in (self.deltas[name].items() if name in self.deltas else ()):
                if not delta.mergeable:
                    raise NotMergeableError(
                        f"adapter {name!r} cannot be merged: its {slot!r} delta ({delta.form} form) has no "
                        "equivalent weight change. Keep it unmerged, or merge only reparam/scale/select adapters."
                    )

    @torch.no_grad()
    def merge(self, names: Sequence[str], untie: Sequence[str] = ()) -> Callable[[], None]:
        """Fold adapters into the base layer; returns a function that restores exactly the state
        before this call (the caller's rollback when another site fails). Parameters named in `untie`
        are shared with other modules (tied embeddings): they get a private copy first, so only this
        site changes. A quantized base layer is dequantized once, every delta folded in, then
        re-quantized; `requantization_error` records the largest weight change that added.

        Raises:
            NotMergeableError: a delta has no weight equivalent (nothing is changed).
            AdapterStateError: the result has NaN/inf weights (the site is restored first).
        """
        todo = [n for n in names if n in self.deltas and n not in self._merged]
        self.check_mergeable(todo)
        if not todo:
            return lambda: None
        before = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
        if self._backup is None:
            self._backup = before
        merged, tied, error = list(self._merged), dict(self._tied), self.requantization_error

        def undo() -> None:
            for param_name in [k for k in self._tied if k not in tied]:  # re-tie what this call untied
                owner, leaf = self._owner(param_name)
                setattr(owner, leaf, self._tied.pop(param_name))
            self.base_layer.load_state_dict(before)
            self._merged[:] = merged
            self._backup = self._backup if merged else None
            self.requantization_error = error

        for param_name in untie:
            if param_name not in self._tied:
                owner, leaf = self._owner(param_name)
                shared = getattr(owner, leaf)
                self._tied[param_name] = shared
                setattr(owner, leaf, nn.Parameter(shared.detach().clone(), requires_grad=False))
        quantized = is_quantized(self.base_layer)
        target = dense_copy(self.base_layer) if quantized else self.base_layer
        original = linear_weight(target).detach().clone() if quantized else None
        try:
            for name in todo:
                for delta in self.deltas[name].values():
                    delta.fold(target)
            if not all(torch.isfinite(p).all() for p in target.parameters() if p.is_floating_point()):
                raise AdapterStateError(f"merging {todo} produced NaN/inf weights; the model was left unmerged.")
            if quantized:
                self.requantization_error = store_dense(self.base_layer, target, original)
        except BaseException:
            undo()
            raise
        self._merged.extend(todo)
        return undo

    def _owner(self, param_name: str) -> tuple[nn.Module, str]:
        path, _, leaf = param_name.rpartition(".")
        return (self.base_layer.get_submodule(path) if path else self.base_layer), leaf

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        if self._backup is None:
            raise AdapterStateError("this site was merged without keeping a backup, so it cannot be unmerged.")
        for param_name, shared in self._tied.items():  # re-tie: the shared tensor was never written
            owner, leaf = self._owner(param_name)
            setattr(owner, leaf, shared)
        self._tied.clear()
        self.base_layer.load_state_dict(self._backup)
        self._backup = None
        self._merged.clear()
        self.requantization_error = None
