"""The method protocol: what a method supplies, and all the engine needs to know about it.

- `Delta` — one adapter's change at one site; the host (`host.py`) composes its hooks.
- `ModelDelta` — a change at the model's inputs (virtual tokens, key/value prefixes): it rewrites
  the forward keyword arguments before the model runs and the outputs after.
- `Controller` — training-time logic of an adapter (rank reallocation, data-scored masks).

Both kinds of delta share one state protocol (`DeltaState`): freezing, saving and counting use
only ``trainable_parameters()``, ``export_state()`` / ``import_state()`` and ``state_shapes()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import NotMergeableError

HOOKS = ("transform_input", "param_overrides", "contribution", "transform_output")
COPY_SLOT = "copy"  # the slot of a module trained as a full copy (``trainable_modules``, the task head)


class DeltaState(nn.Module):
    """What freezing, saving and counting use: `trainable_parameters()` lists what trains;
    `export_state()` / `import_state()` is what goes to and comes from an adapter file."""

    form: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    # True when the delta stores its site's parameter values themselves (a full copy), so the base's
    # own values there are never used: the base fingerprint leaves such sites out.
    holds_values: ClassVar[bool] = False

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    def state_shapes(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Names and shapes `import_state` accepts. By default those `export_state()` gives; a delta
        whose saved shapes depend on what it learned (e.g. pruned ranks) derives them from `state`."""
        return {k: tuple(v.shape) for k, v in self.export_state().items()}

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the training loss while this delta trains (None: nothing)."""
        return None


class Delta(DeltaState):
    """One adapter's trainable change at one site. Subclasses fill in one or more hooks; the
    host runs exactly the hooks a subclass overrides (`hooks`)."""

    hooks: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.hooks = frozenset(h for h in HOOKS if getattr(cls, h) is not getattr(Delta, h))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def param_overrides(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform_output(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor, *,
               overwrite: bool = False) -> torch.Tensor:
        """``out + contribution(x, base, base_out)``; a delta may fuse the addition into its own last
        product (one pass over the output instead of two). `overwrite`: nothing else reads `out` (nor
        `base_out`) after this call, so the delta may add into it in place and return it."""
        return out + self.contribution(x, base, base_out).to(out.dtype)

    def fold(self, base: nn.Module) -> None:
        """Fold this delta into `base`'s weights in place (called under no_grad)."""
        raise NotMergeableError(f"{type(self).__name__} ({self.form} form) cannot be merged into the base weights.")

    @property
    def weightable(self) -> bool:
        """Whether an activation weight can scale this delta (only additive contributions)."""
        return self.hooks <= {"contribution"}


class ModelDelta(DeltaState):
    """A change applied at the model level (the *input* and *context* forms)."""

    weightable: ClassVar[bool] = False

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the keyword arguments of a forward call (inputs, masks, labels, caches)."""
        return kwargs

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the keyword arguments of a `generate()` call; by default the same as forward."""
        return self.prepare(model, kwargs)

    def finish(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        """Undo what `prepare` added to the outputs (e.g. logits at virtual positions)."""
        return outputs

    def finish_generate(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        """Undo what `prepare_generate` added to `generate()`'s result (e.g. placeholder tokens)."""
        return outputs

    def running(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """A context held around one forward or `generate()` call of `model` while this delta is
        active (e.g. to hand the delta's tensors to the model's attention). Default: nothing."""
        return contextlib.nullcontext()

    def release(self, model: nn.Module) -> None:
        """Called when the delta leaves `model` (deleted, merged away, detached): undo anything a
        call left in the model (e.g. an attention route kept for a backward recomputation)."""


class Controller:
    """Per-adapter training-time logic a method may need (e.g. rank reallocation).

    A trainer calls ``tuned.update(step)`` after each optimizer step and before gradients are
    zeroed; the TunedModel forwards it to the controller of every trainable adapter. Whatever a
    controller must carry across a resume is its `state_dict()` (tensors only; checkpoints save it).
    """

    def update(self, tuned: Any, name: str, step: int) -> None:
        return None

    def needs_calibration(self, tuned: Any, name: str) -> bool:
        """Whether adapter `name` must see data (`TunedModel.calibrate`) before it can train or be saved."""
        return False

    def calibrate(self, tuned: Any, name: str, batches: Any, loss_fn: Any = None) -> None:
        """One-off, data-driven set-up before training (e.g. pruning masks scored on a few batches)."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors an exact resume needs (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict()` gave."""
        return None
