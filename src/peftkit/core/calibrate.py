"""Data-driven set-up of adapters before training (e.g. masks scored from gradients).

Some methods decide part of their structure from a few batches of the task: a SNIP/GraSP-pruned
SparseAdapter scores its weights on data before the first optimizer step. Their controller says
so (`Controller.needs_calibration`) and does the work (`Controller.calibrate`); a trainer calls

    if peftkit.needs_calibration(tuned):
        peftkit.calibrate(tuned, first_batches)

once after attaching and before creating the optimizer. The core never names a method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..errors import AdapterStateError
from .tuned import TunedModel

LossFn = Callable[[Any, dict[str, Any]], torch.Tensor]


def needs_calibration(tuned: TunedModel) -> list[str]:
    """Names of the adapters that wait for `calibrate` before training."""
    return [n for n, c in tuned._controllers.items() if c.needs_calibration(tuned, n)]


def calibrate(tuned: TunedModel, batches: Iterable[dict[str, Any]], *, names: str | Sequence[str] | None = None,
              loss_fn: LossFn | None = None) -> list[str]:
    """Calibrate adapters (default: every one that needs it) on `batches` — dicts of model inputs
    with labels, so that ``model(**batch).loss`` exists, or any batches with a
    ``loss_fn(outputs, batch)``. The batches are materialised once (a few are enough).
    Returns the names calibrated.

    Raises:
        AdapterStateError: an unknown adapter name, or no batches.
    """
    todo = needs_calibration(tuned) if names is None else ([names] if isinstance(names, str) else list(names))
    for name in todo:
        tuned.config_of(name)
    batches = list(batches)
    if todo and not batches:
        raise AdapterStateError(f"calibrating {todo} needs at least one batch of task data.")
    for name in todo:
        controller = tuned._controllers.get(name)
        if controller is not None:
            controller.calibrate(tuned, name, batches, loss_fn)
    return todo
