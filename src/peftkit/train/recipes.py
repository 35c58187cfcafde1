"""A method's recommended training settings: its *recipe*, owned by training.

The engine never reads these. A method may declare one when it registers
(``MethodSpec(recipe={"lr": 1e-2})``, keys of `Recipe`); `recipe` is the one lookup trainers use,
and a run's own flags always win. Why each method's recipe is what it is stands next to its
registration; the measurements behind the choices are in ``benchmarks/results/recipes.md``.

Two choices need more words than a comment, both for methods whose trainable signal reaches a new
task head only through the features of a frozen backbone (soft prompts, ``probe_head`` and
``base_dropout=0``):

- the head reads the first position, a virtual token, whose features vary across examples by less
  than the backbone's own dropout perturbs them; with dropout on, the prompt's gradients are mostly
  noise, so the frozen base's dropout is turned off;
- a head on features that vary so little needs large weights (logistic regression finds them),
  which Adam, moving each weight by about the learning rate per step, does not reach in a short
  run from a random start; so the new head is first fitted by logistic regression (`probe.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..core import registry
from ..errors import ConfigError

# The rates for methods without one of their own: adapters on small models in runs of about an epoch.
DEFAULT_LR = 1e-3
TASK_LR = {"instruction": 2e-3}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a training run starts from for one method, where the user gives nothing else."""

    lr: float | None = None  # peak learning rate; None: the task's default (TASK_LR, DEFAULT_LR)
    head_lr: float | None = None  # peak rate of a new task head; None: `lr`
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # method options under the user's
    base_dropout: float | None = None  # dropout probability inside the frozen base; None: the model's own
    probe_head: bool = False  # fit a new task head by logistic regression before training

    def lr_for(self, task: str) -> float:
        return self.lr if self.lr is not None else TASK_LR.get(task, DEFAULT_LR)


def recipe(method: str | None) -> Recipe:
    """The registered method's recipe (an empty one for methods without, or unknown names)."""
    if method is None or method not in registry.methods():
        return Recipe()
    declared = registry.get(method).recipe or {}
    try:
        return Recipe(**declared)
    except TypeError as err:
        fields = ", ".join(f.name for f in dataclasses.fields(Recipe))
        raise ConfigError(f"method {method!r} declares an invalid recipe {dict(declared)!r} ({err}); "
                          f"its keys are {fields}.") from None
