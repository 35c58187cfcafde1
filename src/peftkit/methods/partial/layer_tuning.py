"""Layer tuning: fine-tune whole transformer blocks (by default the last one), freeze the rest.

Reference: the "last-k layers" partial fine-tuning baseline (e.g. Lee et al., "What would Elsa
do? Freezing layers during transformer fine-tuning", 2019; the survey's *partial* family).
Formula: every parameter θ of a selected block is replaced by a trainable copy θ'; the other
blocks, the embeddings and the norms outside are frozen.

Placement: the last ``last_k`` blocks (default 1), or the blocks named by ``layers`` (indices,
``"0-3,5"``, ``"-2:"``), plus any modules named by ``targets`` (e.g. ``"pooler"``), each tuned whole.
Blocks are found from the model's structure (`arch.blocks`). Inside a tuned module every
parameter-owning layer becomes its own site, so mixed-adapter batches work as for LoRA.

Init: the copies equal the pretrained values (unchanged model at init). Storage: the tuned values
(`TrainableCopy`), exact on load and merge, base never written (exact ``disabled()``). The task
head trains as a full copy (``trainable_modules="auto"``).
Training recipe (`peftkit methods`): learning rate 1e-4, as for full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core import arch
from ...core.config import MethodConfig, check, size
from ...core.forms.select import TrainableCopy
from ...core.linear import is_quantized
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import LayerSpec, Spec, iter_sites, parse_layers, select
from ...errors import TargetError
from ._scope import backbone_modules

SLOT = "layer"


@dataclass(frozen=True)
class LayerTuningConfig(MethodConfig):
    """Options of ``layer_tuning``: `layers` (block indices) overrides `last_k`; `targets` adds
    named modules tuned whole."""

    method = "layer_tuning"
    last_k: int = 1
    layers: LayerSpec = None
    targets: Spec = None

    def problems(self):
        k = self.last_k
        yield from size("last_k", k, 0)
        yield from check(bool(k) or self.layers is not None or self.targets is not None,
                         "last_k=0 with no layers and no targets tunes nothing; set one of them")


def _roots(model: nn.Module, config: LayerTuningConfig) -> list[str]:
    roots: list[str] = []
    if config.layers is not None or config.last_k:
        blocks = [b.block for b in arch.blocks(model)]
        if config.layers is not None:
            wanted = parse_layers(config.layers, len(blocks))
        else:
            wanted = set(range(max(0, len(blocks) - config.last_k), len(blocks)))
        roots.extend(b for i, b in enumerate(blocks) if i in wanted)
    if config.targets is not None:
        roots.extend(select(model, config.targets))
    return list(dict.fromkeys(roots))


def tuned_sites(model: nn.Module, config: LayerTuningConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning parameters inside the selected roots; a module that
    owns parameters covers its whole subtree (its copy holds all of them).

    Raises:
        TargetError: blocks cannot be found, an entry matches nothing, or nothing has parameters.
    """
    roots = _roots(model, config)
    backbone = {n for n, _ in backbone_modules(model)}
    sites: list[tuple[str, nn.Module]] = []
    for name, module in iter_sites(model):
        inside = any(name == r or name.startswith(r + ".") for r in roots)
        if inside and is_quantized(module):
            raise TargetError(f"layer_tuning trains full copies of weights, but {name} is quantized (frozen storage); "
                              "use a delta method (lora, ia3, adapter, ...) on a quantized base, or tune other layers.")
        covered = any(name.startswith(s + ".") for s, _ in sites)
        owns_params = any(p is not None for p in module._parameters.values())
        if inside and not covered and owns_params and name in backbone:
            sites.append((name, module))
    if not sites:
        raise TargetError(f"layer_tuning selects {roots or 'nothing'}, which hold no backbone parameters; "
                          "choose other layers or targets.")
    return sites


def build(model: nn.Module, config: LayerTuningConfig) -> Attachment:
    attachment = Attachment()
    for site, module in tuned_sites(model, config):
        attachment.add(site, SLOT, TrainableCopy(module))
    return attachment


register(MethodSpec(
    name="layer_tuning",
    family="partial",
    config_cls=LayerTuningConfig,
    build=build,
    summary="Fine-tune whole blocks (last k, or named layers/modules) as trainable copies; mergeable.",
    identity_at_init=True,
    # Whole blocks are fine-tuned as in full fine-tuning, where 1e-3 with AdamW is too large.
    recipe={"lr": 1e-4},
))
