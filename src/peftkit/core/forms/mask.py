"""The *mask* form: a fixed sparsity mask over any delta's weight tensors.

`MaskedDelta` wraps a delta built by another method and re-parametrises each pruned tensor W as
its kept values v (a 1-D trainable tensor) and a fixed boolean mask M:
``W = scatter(M, v)`` — i.e. ``W ⊙ M`` with the removed entries not stored at all. The wrapped
delta's code runs unchanged (`torch.nn.utils.parametrize` serves it the dense W), so masks work
over adapters, LoRA or any delta that keeps its tensors as parameters.

Guarantees: a removed weight is exactly zero in every forward and after any optimizer step (it is
not a parameter, so no gradient, momentum or weight decay can reach it); trainable counts and the
optimizer state cover the kept weights only. Saved state: per pruned tensor ``<name>.kept`` (the
values, in mask order) and ``<name>.mask`` (the mask, bit-packed into uint8, 8 weights per byte),
so the file size follows the sparsity. Until a mask is set the delta is dense (mask all ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...errors import AdapterFileError, AdapterStateError, ConfigError
from ..protocol import Delta
from ..targets import as_entries

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte (row-major, least significant bit first)."""
    flat = mask.detach().flatten().to("cpu", torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask` for a tensor of `shape`."""
    numel = int(torch.Size(shape).numel())
    bits = (packed.to("cpu", torch.uint8).unsqueeze(1) & _BITS).ne(0).flatten()
    return bits[:numel].view(shape)


def packed_size(shape: torch.Size | tuple[int, ...]) -> int:
    return (int(torch.Size(shape).numel()) + 7) // 8


class SparseWeight(nn.Module):
    """Parametrisation: the dense tensor from its kept values (``original``) and a fixed mask."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device), persistent=False)
        self.full = True

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.full:
            return values.view(self.mask.shape)
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values)

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(-1) if self.full else dense[self.mask]


def default_prunable(inner: nn.Module, params: Any = None) -> list[str]:
    """Names of the inner delta's tensors to prune: those matching `params` (exact name or dotted
    suffix), or by default every tensor with 2+ dimensions (weights; biases and vectors stay dense).
    May be empty (e.g. the norm copies a Houlsby adapter trains)."""
    named = dict(inner.named_parameters())
    if params is None:
        return [n for n, p in named.items() if p.dim() >= 2]
    entries = as_entries(params)
    return [n for n in named if any(n == e or n.endswith("." + e) for e in entries)]


class MaskedDelta(Delta):
    """`inner` with masks over the tensors named in `prunable`; hooks and merging are the inner's."""

    form = "mask"

    def __init__(self, inner: Delta, prunable: list[str], awaiting: str | None = None, owner: Any = None) -> None:
        super().__init__()
        if type(inner).export_state is not Delta.export_state or type(inner).import_state is not Delta.import_state:
            raise ConfigError(f"{type(inner).__name__} saves its state its own way; masks need a delta whose "
                              "state is its plain state_dict.")
        self.inner = inner
        self.hooks = inner.hooks
        self.mergeable = inner.mergeable
        self.holds_values = inner.holds_values
        self.prunable = list(prunable)
        self.awaiting = awaiting  # the data-driven score still to compute, or None once pruned
        self.calibrating = False
        self.owner = owner  # what chose the mask (a config): several masked parts can share one adapter
        for name in self.prunable:
            module, leaf = self._owner(name)
            weight = getattr(module, leaf)
            parametrize.register_parametrization(module, leaf, SparseWeight(weight.shape, weight.device))

    # -- the pruned tensors ------------------------------------------------------------------
    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return (self.inner.get_submodule(path) if path else self.inner), leaf

    def _param(self, name: str) -> tuple[SparseWeight, nn.Parameter]:
        owner, leaf = self._owner(name)
        plist = owner.parametrizations[leaf]
        return plist[0], plist.original

    def _original_key(self, name: str) -> str:
        path, _, leaf = name.rpartition(".")
        return f"{path + '.' if path else ''}parametrizations.{leaf}.original"

    def dense(self, name: str) -> torch.Tensor:
        """The weight the inner delta computes with (removed entries exactly zero)."""
        owner, leaf = self._owner(name)
        return getattr(owner, leaf)

    def kept_values(self, name: str) -> nn.Parameter:
        return self._param(name)[1]

    def mask(self, name: str) -> torch.Tensor:
        return self._param(name)[0].mask

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Fix `mask` on tensor `name`; the kept values are the current dense ones unless given."""
        sparse, original = self._param(name)
        dense = self.dense(name).detach()
        if mask.shape != dense.shape:
            raise AdapterStateError(f"mask of shape {tuple(mask.shape)} for {name} of shape {tuple(dense.shape)}")
        mask = mask.to(device=dense.device, dtype=torch.bool)
        kept = dense[mask] if values is None else values.to(original.device, original.dtype).reshape(-1)
        sparse.mask = mask
        sparse.full = False
        original.data = kept.clone().contiguous()

    # -- hooks: the inner delta's, refused while a data-driven mask is still pending -----------
    def _check_ready(self) -> None:
        if self.awaiting and not self.calibrating:
            raise AdapterStateError(f"this adapter's masks are scored by {self.awaiting!r}, which needs data: call "
                                    "tuned.calibrate(batches) with a few training batches before training, "
                                    "or choose score='magnitude' / 'random'.")

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        with parametrize.cached():
            return self.inner.transform_input(x)

    def param_overrides(self, base: nn.Module) -> dict[str, torch.Tensor]:
        self._check_ready()
        with parametrize.cached():
            return self.inner.param_overrides(base)

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        with parametrize.cached():
            return self.inner.contribution(x, base, base_out)

    def transform_output(self, y: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        with parametrize.cached():
            return self.inner.transform_output(y)

    def fold(self, base: nn.Module) -> None:
        self._check_ready()
        with parametrize.cached():
            self.inner.fold(base)

    def regularizer(self) -> torch.Tensor | None:
        return self.inner.regularizer()

    # -- protocol ------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        own = [p for p in self.inner.trainable_parameters() if isinstance(p, nn.Parameter)]
        for p in [*own, *(self.kept_values(n) for n in self.prunable)]:
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.awaiting:
            raise AdapterStateError(f"masks scored by {self.awaiting!r} are not computed yet; "
                                    "call tuned.calibrate(batches) before saving.")
        state = dict(self.inner.export_state())
        for name in self.prunable:
            state.pop(self._original_key(name), None)
            state[f"{name}.kept"] = self.kept_values(name).detach()
            state[f"{name}.mask"] = pack_mask(self.mask(name))
        return state

    def state_shapes(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(v.shape) for k, v in self.inner.export_state().items()}
        for name in self.prunable:
            shapes.pop(self._original_key(name), None)
            shape = self.mask(name).shape
            shapes[f"{name}.mask"] = (packed_size(shape),)
            packed = state.get(f"{name}.mask")
            if packed is not None and tuple(packed.shape) == shapes[f"{name}.mask"]:
                shapes[f"{name}.kept"] = (int(unpack_mask(packed, shape).sum()),)  # as many values as kept bits
            else:
                shapes[f"{name}.kept"] = (int(self.mask(name).sum()),)
        return shapes

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        for name in self.prunable:
            mask = unpack_mask(state.pop(f"{name}.mask"), self.mask(name).shape)
            values = state.pop(f"{name}.kept")
            if values.numel() != int(mask.sum()):
                raise AdapterFileError(f"{name}: {values.numel()} kept values for a mask keeping {int(mask.sum())}.")
            self.set_mask(name, mask, values)
            state[self._original_key(name)] = self.kept_values(name).detach()
        self.inner.import_state(state)
        self.awaiting = None
