"""MAM adapter ("Mix-And-Match"): prefix tuning on attention + a scaled parallel adapter on the FFN.

Paper: He, Zhou, Ma, Berg-Kirkpatrick & Neubig, "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR 2022.
Formula: ``attn(Q, [P_K; K], [P_V; V])`` in every block (prefix, l = 30, reparameterised through
an MLP of width 800 while training) and ``FFN(x) + s·W_up·ReLU(W_down·x)`` (s = 4, bottleneck 512)
— on BART-large (hidden 1024), ~6.7 % extra parameters, on par with full fine-tuning.

Built as ``compose(prefix_tuning, parallel_adapter)`` — no layer code of its own. Defaults: the
paper's l = 30 and s = 4; the bottleneck and the prefix MLP width scale with the hidden size d
(``512·d/1024`` and ``800·d/1024``; MiniLM d = 384 → 192 and 300) unless given. `layers` limits
both parts to some blocks. Not mergeable (the prefix lives outside the weights), no mixed batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import MethodConfig, number, size
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import LayerSpec
from . import compose
from .recipes import hidden_size, scaled

PAPER_HIDDEN = 1024  # BART-large


@dataclass(frozen=True)
class MamConfig(MethodConfig):
    """Options of ``mam``; sizes left at None follow the paper, scaled to the model."""

    method = "mam"
    prefix_length: int = 30
    prefix_hidden: int | None = None
    bottleneck: int | None = None
    scale: float = 4.0
    layers: LayerSpec = None

    def problems(self):
        yield from size("prefix_length", self.prefix_length)
        for name in ("prefix_hidden", "bottleneck"):
            yield from size(name, getattr(self, name), optional=True, note=" (None: the paper's size, scaled)")
        yield from number("scale", self.scale, "other than 0", lambda s: s != 0)

    def parts(self, model: nn.Module) -> compose.ComposeConfig:
        """The composition this recipe stands for, sized for `model`."""
        d = hidden_size(model)
        prefix = {"method": "prefix_tuning", "num_virtual_tokens": self.prefix_length,
                  "reparam_hidden": self.prefix_hidden or scaled(800, PAPER_HIDDEN, d), "layers": self.layers}
        adapter = {"method": "parallel_adapter", "bottleneck": self.bottleneck or scaled(512, PAPER_HIDDEN, d),
                   "scale": self.scale, "layers": self.layers}
        return compose.ComposeConfig(parts=[prefix, adapter])


def build(model: nn.Module, config: MamConfig) -> Attachment:
    return compose.build(model, config.parts(model))


register(MethodSpec(
    name="mam",
    family="hybrid",
    config_cls=MamConfig,
    build=build,
    summary="MAM adapter: prefix tuning (attention) + scaled parallel adapter (FFN), paper sizes scaled to the model.",
    # Its prefix MLP and the 4x-scaled parallel adapter collapse the features at the adapters' 1e-3; the new
    # task head needs prefix tuning's 1e-2 (benchmarks/results/recipes.md).
    recipe={"lr": 3e-4, "head_lr": 1e-2},
))
