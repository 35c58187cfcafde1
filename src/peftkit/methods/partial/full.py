"""Full fine-tuning: every weight of the model trained — the baseline the PEFT methods are measured against.

Reference: the survey's yardstick (every PEFT paper reports "full fine-tuning" beside its method);
here it is the limit of the *partial* family, where the selection is the whole network.
Formula: every parameter θ is replaced by a trainable copy θ' (θ' = θ at init); nothing is frozen.

Placement: every module of the backbone that owns parameters (embeddings, attention and FFN
projections, norms, a pooler), the output projection of a language model, and the task head
(``trainable_modules="auto"``). A weight shared by two modules stays shared: a language model's
output projection tied to its input embedding reads the embedding's trainable copy, so one matrix
learns from both uses, exactly as when the plain model is fine-tuned.

Init: the copies equal the pretrained values (the model is unchanged at init). Storage: the tuned
values (`TrainableCopy`), so the "adapter" file holds the whole model; the base is never written
(exact ``disabled()``). Merge: the values are copied into the base. A quantized base is refused
(its weights are frozen storage).
Training recipe (`peftkit methods`): learning rate 5e-5, the usual rate for fully fine-tuning a
pretrained transformer with AdamW (1e-3, the adapters' rate, wrecks the pretrained weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import MethodConfig
from ...core.forms.select import TrainableCopy
from ...core.linear import is_quantized
from ...core.protocol import Delta
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import iter_sites, output_head_names
from ...errors import TargetError
from ._scope import backbone_modules

SLOT = "full"


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """``full`` has no options of its own (``trainable_modules`` adds modules outside the backbone)."""

    method = "full"


class TiedCopy(Delta):
    """The output projection's weights when some are tied to a backbone weight: the tied ones are
    read from that weight's `TrainableCopy` (shared, stored once, by the embedding), the others are
    this delta's own trainable copies."""

    form = "select"
    mergeable = True
    holds_values = True

    def __init__(self, base: nn.Module, shared: dict[str, tuple[TrainableCopy, str]]) -> None:
        super().__init__()
        self.values = nn.ParameterDict({name.replace(".", "__"): nn.Parameter(p.detach().clone())
                                        for name, p in base.named_parameters() if name not in shared})
        # a plain dict, not a submodule: the source copy is saved, moved and counted by its own site
        self.shared = dict(shared)

    def _named_values(self) -> dict[str, torch.Tensor]:
        own = {key.replace("__", "."): value for key, value in self.values.items()}
        return {**own, **{name: copy.values[key] for name, (copy, key) in self.shared.items()}}

    def param_overrides(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return self._named_values()

    def fold(self, base: nn.Module) -> None:
        params = dict(base.named_parameters())
        for name, value in self._named_values().items():
            params[name].copy_(value.to(params[name].dtype))


def full_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every backbone module that owns parameters, in model order; a module
    that owns parameters covers its whole subtree (its copy holds all of them)."""
    sites: list[tuple[str, nn.Module]] = []
    for name, module in backbone_modules(model):
        if is_quantized(module):
            raise TargetError(f"full fine-tuning trains copies of every weight, but {name} is quantized (frozen "
                              "storage); use a delta method (lora, qlora, ...) on a quantized base, or load it unquantized.")
        covered = any(name.startswith(s + ".") for s, _ in sites)
        if not covered and any(p is not None for p in module._parameters.values()):
            sites.append((name, module))
    return sites


def build(model: nn.Module, config: FullConfig) -> Attachment:
    attachment = Attachment()
    owner: dict[int, tuple[TrainableCopy, str]] = {}  # id(parameter) -> (the copy holding it, its key)
    for site, module in full_sites(model):
        copy = TrainableCopy(module)
        attachment.add(site, SLOT, copy)
        for name, p in module.named_parameters():
            owner.setdefault(id(p), (copy, name.replace(".", "__")))
    modules = dict(iter_sites(model))
    for site in output_head_names(model):
        module = modules[site]
        shared = {name: owner[id(p)] for name, p in module.named_parameters() if id(p) in owner}
        attachment.add(site, SLOT, TiedCopy(module, shared) if shared else TrainableCopy(module))
    if not attachment.sites:
        raise TargetError(f"{type(model).__name__} has no parameters outside its task head; full fine-tuning has "
                          "nothing to train (use head_only for the head alone).")
    return attachment


register(MethodSpec(
    name="full",
    family="partial",
    config_cls=FullConfig,
    build=build,
    summary="Full fine-tuning: every weight as a trainable copy (tied weights stay tied); the baseline; mergeable.",
    identity_at_init=True,
    recipe={"lr": 5e-5},
))
