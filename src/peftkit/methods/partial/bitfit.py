"""BitFit: tune only the bias terms.

Paper: Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022.
Formula: every selected bias b becomes ``b + Δb``; at a linear or norm site
``y = base(x) + Δb`` (a `BiasShift`), the rest of the network is frozen.

Placement: ``biases="all"`` (default) — every bias of the backbone: attention and FFN projections
and the LayerNorm biases (~0.08 % of BERT's parameters); the task head trains as a full copy
(``trainable_modules="auto"``). A subset is a list of entries, each a *role* found from the model's
structure — ``query``, ``key``, ``value``, ``attn_out``, ``ffn_in`` (FFN intermediate / up / gate),
``ffn_out`` — or any target entry (suffix, ``re:``, ``type:``), whose module and its children
contribute their biases. The paper's "query + FFN-intermediate" subset is
``biases=["query", "ffn_in"]`` (on BERT also ``["query", "intermediate"]``). ``exclude`` and
``layers`` filter as for other methods. Models without biases (Llama, Mistral) are refused.

Init: Δb = 0, so the model is unchanged at init. Storage: the shifts Δb only (float32), so the
base stays pristine: ``disabled()`` and loading onto a fresh base are exact, and weight decay on
Δb pulls towards the pretrained bias, not towards zero. Merge: ``b += Δb``. Paper lr ≈ 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core import arch
from ...core.config import MethodConfig, check
from ...core.forms.select import BiasShift
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import LayerSpec, Spec, as_entries, select
from ...errors import TargetError
from ._scope import backbone_modules, owns

ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
SLOT = "bias"


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """Options of ``bitfit``: `biases` is ``"all"`` or a list of roles / target entries."""

    method = "bitfit"
    biases: Spec = "all"
    exclude: Spec = None
    layers: LayerSpec = None

    def problems(self):
        # the type of `biases` is checked with every target spec; here only that it names something
        yield from check(self.biases is not None, "biases must be 'all' or a non-empty list, got None")


def _role_sites(model: nn.Module, role: str) -> list[str]:
    names: list[str] = []
    for block in arch.blocks(model):
        found = getattr(block, role)
        names.extend([found] if isinstance(found, str) else (found or []))
    return names


def _targets(model: nn.Module, biases: Spec) -> list[str]:
    """Target entries for `select`: roles become the exact module names they resolve to."""
    if as_entries(biases) == ["all"]:
        return ["re:.+"]
    out: list[str] = []
    for entry in as_entries(biases):
        if entry not in ROLES:
            out.append(entry)
            continue
        resolved = _role_sites(model, entry)
        if not resolved:
            raise TargetError(f"role {entry!r} is not a separate layer in {type(model).__name__} (e.g. a fused "
                              "query/key/value projection); name the module instead, e.g. its suffix.")
        out.extend(resolved)
    return out


def bias_sites(model: nn.Module, config: BitFitConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of the backbone modules owning a bias inside the selection, in model order.

    Raises:
        TargetError: an entry matches nothing, or the selection holds no bias at all.
    """
    chosen = select(model, _targets(model, config.biases), exclude=config.exclude, layers=config.layers)
    roots = set(chosen)
    excluded = set(select(model, config.exclude)) if config.exclude is not None else set()
    sites = []
    for name, module in backbone_modules(model):
        if not owns(module, "bias") or module.bias is None:
            continue
        prefixes = [name[:i] for i in range(len(name)) if name[i] == "."] + [name]
        if any(p in roots for p in prefixes) and not any(p in excluded for p in prefixes):
            sites.append((name, module))
    if not sites:
        raise TargetError(f"biases={config.biases!r} selects no bias term: {type(model).__name__} "
                          f"{'has none (bias-free layers, as in Llama)' if config.biases == 'all' else 'has none there'}. "
                          "Use ln_tuning or lora instead, or select modules that have biases.")
    return sites


def build(model: nn.Module, config: BitFitConfig) -> Attachment:
    attachment = Attachment()
    for site, module in bias_sites(model, config):
        attachment.add(site, SLOT, BiasShift(module))
    return attachment


register(MethodSpec(
    name="bitfit",
    family="partial",
    config_cls=BitFitConfig,
    build=build,
    summary="Train only bias terms (all, or roles such as query + FFN-intermediate); stored as shifts; mergeable.",
    identity_at_init=True,
    # Shifting biases barely moves the features at first, so a new task head at the biases' rate stays near
    # the majority class (as under a prefix); the biases themselves need more than the adapters' 1e-3 in a
    # short run, and collapse the features from about 1e-2 (benchmarks/results/recipes.md).
    recipe={"lr": 3e-3, "head_lr": 1e-2},
))
