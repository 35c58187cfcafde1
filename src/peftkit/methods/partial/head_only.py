"""Head only (linear probing): the pretrained backbone frozen whole, only the task head trained.

Reference: the frozen-features baseline of transfer learning (a "linear probe"; Kumar et al., ICLR
2022, compare it with full fine-tuning); the survey's *partial* family with an empty selection.
Formula: ``y = head'(f(x))`` with the backbone f unchanged and head' a trainable copy of the head.

Placement: nothing in the backbone; the task head of a classification model trains as a full copy
(``trainable_modules="auto"``), or the modules ``trainable_modules`` names. A model without a task
head (a language model: its output projection is part of the pretrained model) is refused.

Init: the head's copy equals the loaded head. Storage: the head's values only.
Training recipe (`peftkit methods`): the head is first fitted by logistic regression on the frozen
features (``probe_head``, the closed-form optimum a linear probe converges to), then trained on with
the base's dropout off, so its features are the ones it was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import MethodConfig
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import as_entries, head_names
from ...errors import TargetError


@dataclass(frozen=True)
class HeadOnlyConfig(MethodConfig):
    """``head_only`` has no options of its own; ``trainable_modules`` says what trains (default: the head)."""

    method = "head_only"


def build(model: nn.Module, config: HeadOnlyConfig) -> Attachment:
    spec = config.trainable_modules
    if spec == "auto" and not head_names(model):
        raise TargetError(f"head_only trains only the task head, and {type(model).__name__} has none (a language "
                          "model's output projection is part of the pretrained model); train it with a method that "
                          "adapts the backbone (lora, ...), or name modules with trainable_modules.")
    if spec != "auto" and not as_entries(spec):
        raise TargetError("head_only with trainable_modules empty trains nothing; leave trainable_modules as 'auto' "
                          "(the task head) or name the modules to train.")
    return Attachment()


register(MethodSpec(
    name="head_only",
    family="partial",
    config_cls=HeadOnlyConfig,
    build=build,
    summary="Linear probing: the backbone frozen, only the task head trained (fitted first); the frozen baseline.",
    identity_at_init=True,
    recipe={"probe_head": True, "base_dropout": 0.0},
))
