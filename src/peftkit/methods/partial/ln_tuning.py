"""LayerNorm tuning: tune only the normalisation layers' scale and shift.

References: the LayerNorm-only baseline of BitFit's family of "select" methods; Zhao et al.,
"Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning" (ICLR 2024), and
Hugging Face PEFT's ``LN_TUNING``.
Formula: ``y = γ' ⊙ (x − μ)/σ + β'`` (RMSNorm: ``y = γ' ⊙ x/rms(x)``) with γ', β' trainable copies
of the pretrained γ, β; everything else frozen.

Placement: by default every normalisation module of the backbone (class name containing "Norm":
``LayerNorm``, ``LlamaRMSNorm``, ...); ``targets`` / ``exclude`` / ``layers`` narrow it. The task
head trains as a full copy (``trainable_modules="auto"``).

Init: the copies equal the pretrained values, so the model is unchanged at init. Storage: the
tuned values themselves (a `TrainableCopy`), like PEFT's ``LN_TUNING`` files: the forward uses
exactly the stored tensors, so loading onto a pristine base is bit-exact in both file formats, and
``disabled()`` is exact because the base is never written. Merge: copy the values into the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import SiteConfig
from ...core.forms.select import TrainableCopy
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import select
from ...errors import TargetError
from ._scope import backbone_modules
from .ln_tuning_hf import LN_TUNING_CODEC

SLOT = "ln"


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with its own floating-point parameters."""
    own = [p for p in module._parameters.values() if p is not None and p.is_floating_point()]
    return "norm" in type(module).__name__.lower() and bool(own)


@dataclass(frozen=True)
class LnTuningConfig(SiteConfig):
    """Options of ``ln_tuning``; ``targets=None`` means every norm layer of the backbone."""

    method = "ln_tuning"


def norm_sites(model: nn.Module, config: LnTuningConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of the selected norm layers.

    Raises:
        TargetError: an entry matches nothing or only non-norm modules, or the model has no norm.
    """
    if config.targets is None:
        allowed = {n for n, m in backbone_modules(model) if is_norm(m)}
        if not allowed:
            raise TargetError(f"{type(model).__name__} has no normalisation layer with parameters; "
                              "ln_tuning has nothing to tune.")
        names = select(model, sorted(allowed), exclude=config.exclude, layers=config.layers)
    else:
        names = select(model, config.targets, exclude=config.exclude, layers=config.layers, accept=is_norm,
                       accept_label="normalisation layers (LayerNorm, RMSNorm, ...)")
    modules = dict(backbone_modules(model))
    return [(n, modules[n]) for n in names if n in modules and is_norm(modules[n])]


def build(model: nn.Module, config: LnTuningConfig) -> Attachment:
    attachment = Attachment()
    for site, module in norm_sites(model, config):
        attachment.add(site, SLOT, TrainableCopy(module))
    return attachment


register(MethodSpec(
    name="ln_tuning",
    family="partial",
    config_cls=LnTuningConfig,
    build=build,
    summary="Train only the norm layers' weights and biases (trainable copies); mergeable; PEFT LN_TUNING format.",
    hf=LN_TUNING_CODEC,
    identity_at_init=True,
))
