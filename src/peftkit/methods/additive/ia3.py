"""(IA)³ — Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., NeurIPS 2022).

Learned vectors rescale activations: on attention keys and values ``y = l ⊙ (W x + b)``, on the
FFN down projection the *input* ``y = W (l ⊙ x) + b``. Placement: the key and value projections
(a fused qkv projection such as GPT-2's ``c_attn`` is scaled as a whole, as PEFT does) and the FFN
down projection of every block, found by `core.arch`; or any linear layers given as `targets`,
with `feedforward` naming those scaled on the input. Init: ones, so the model is unchanged at init.
Mergeable: ``W ← diag(l) W, b ← l ⊙ b`` (output) or ``W ← W diag(l)`` (input). Training keeps no copy of a
scaled input where backward can rebuild it from what the input's producer keeps (`core.rebuild`).
Training recipe (`peftkit methods`): learning rate 1e-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import arch, rebuild
from ...core.config import SiteConfig
from ...core.linear import assign_linear_weight, delta_dtype, device_of, is_linear, linear_dims, linear_weight
from ...core.protocol import Delta
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import Spec, as_entries, base_at, matches, select
from .ia3_hf import IA3_CODEC


@dataclass(frozen=True)
class IA3Config(SiteConfig):
    """Options of ``ia3``. `feedforward`: target entries whose layer is scaled on its input (default:
    the FFN down projections when `targets` is not given, nothing otherwise)."""

    method = "ia3"
    feedforward: Spec = None

    def placement(self, model: nn.Module) -> tuple[Spec, list[str]]:
        """(target spec, entries of the layers scaled on their input), defaults filled in for `model`."""
        feedforward = as_entries(self.feedforward)
        if self.targets is not None:
            return self.targets, feedforward
        option = "targets=[...] and feedforward=[...]"
        ffn = [arch.require(roles, "ffn_out", option) for roles in arch.blocks(model)]
        return arch.projections(model, "key", "value") + ffn, feedforward or ffn

    @staticmethod
    def scales_input(site: str, feedforward: list[str]) -> bool:
        return any(matches(entry, site) for entry in feedforward)


class _Scale(Delta):
    form = "scale"
    mergeable = True

    def __init__(self, base: nn.Module, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size, dtype=delta_dtype(base), device=device_of(base)))


class ScaleOutput(_Scale):
    """``y = l ⊙ base(x)``, l ∈ R^{out}."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base, linear_dims(base)[1])

    def transform_output(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale.to(y.dtype)

    def fold(self, base: nn.Module) -> None:
        weight = linear_weight(base)
        assign_linear_weight(base, weight * self.scale.to(weight.dtype).unsqueeze(1))
        if isinstance(getattr(base, "bias", None), torch.Tensor):
            base.bias.mul_(self.scale.to(base.bias.dtype))


class _ScaledInput(torch.autograd.Function):
    """``x ⊙ l``. l's gradient needs x, which the frozen layer reading the product does not keep: backward
    rebuilds x from what x's producer keeps (the FFN's GELU input, a gated MLP's two factors) where it can,
    as plain autograd's product would otherwise keep x itself. The gradients are plain autograd's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, rebuilder: rebuild.Rebuilder) -> torch.Tensor:
        kept_x, ctx.rebuild_step = rebuild.saved_form(rebuilder, x, ctx.needs_input_grad[1])
        ctx.save_for_backward(scale, *kept_x)
        return x * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, *kept_x = ctx.saved_tensors
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if kept_x:
            grad_scale = (grad * rebuild.restored(ctx.rebuild_step, kept_x)).sum_to_size(scale.shape)
        return grad_x, grad_scale, None


class ScaleInput(_Scale):
    """``y = base(l ⊙ x)``, l ∈ R^{in}."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base, linear_dims(base)[0])
        self.rebuilder: rebuild.Rebuilder | None = None  # set by `build`: rebuilds x in backward instead of keeping it

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.rebuilder is None or torch.compiler.is_compiling():
            return x * self.scale.to(x.dtype)
        return _ScaledInput.apply(x, self.scale.to(x.dtype), self.rebuilder)

    def fold(self, base: nn.Module) -> None:
        weight = linear_weight(base)
        assign_linear_weight(base, weight * self.scale.to(weight.dtype).unsqueeze(0))


def build(model: nn.Module, config: IA3Config) -> Attachment:
    targets, feedforward = config.placement(model)
    sites = select(model, targets, exclude=config.exclude, layers=config.layers, accept=is_linear,
                   accept_label="Linear and Conv1D layers")
    attachment, rebuilder = Attachment(), rebuild.Rebuilder(model)
    for site in sites:
        base = base_at(model, site)
        if config.scales_input(site, feedforward):
            delta = ScaleInput(base)
            delta.rebuilder = rebuilder
        else:
            delta = ScaleOutput(base)
        attachment.add(site, "ia3", delta)
    return attachment


register(MethodSpec(
    name="ia3",
    family="additive",
    config_cls=IA3Config,
    build=build,
    summary="Learned vectors scaling keys, values and the FFN down-projection input; mergeable.",
    hf=IA3_CODEC,
    identity_at_init=True,
    # T-Few trains (IA)³ at 3e-3 over many more steps; runs of an epoch or so need 1e-2 (head included).
    recipe={"lr": 1e-2},
))
