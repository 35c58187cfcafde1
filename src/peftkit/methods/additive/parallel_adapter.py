"""Parallel / scaled parallel adapter (He et al., ICLR 2022, "Towards a Unified View of PETL").

``y = FFN(x) + s · W_up · act(W_down · x + b_down) + b_up`` — computed from the FFN *input* x and
added to the FFN output (before residual + normalisation). Placement: the FFN of every block found
by `core.arch`. The adapter reads its input where the FFN's first linear layer reads it (an input
tap) and adds its output at the FFN down projection, so FFNs split over several modules (BERT's
``intermediate`` / ``output``) and single modules (Llama's ``mlp``) are treated alike and the
sites stay leaf layers that other adapters can share. With `targets`, each target gets its own
adapter from its input to its output instead. Init: LoRA-style, W_down Kaiming-uniform (a=√5),
W_up = 0, biases 0, so the model is exactly unchanged at init. Defaults: m = 64, s = 4, ReLU.
Not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core import arch
from ...core.config import SiteConfig, number
from ...core.linear import delta_dtype, device_of, is_linear, linear_dims
from ...core.protocol import Delta
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import base_at, select
from ...errors import AdapterStateError, TargetError
from .bottleneck import Bottleneck, bottleneck_problems, bottleneck_size


@dataclass(frozen=True)
class ParallelAdapterConfig(SiteConfig):
    """Options of ``parallel_adapter``."""

    method = "parallel_adapter"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    scale: float = 4.0
    activation: str = "relu"

    def problems(self):
        yield from bottleneck_problems(self.bottleneck, self.reduction_factor, self.activation)
        yield from number("scale", self.scale, "other than 0", lambda s: s != 0)


class Tap:
    """The input one site saw, handed to the adapter at another site of the same block."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise AdapterStateError("a parallel adapter ran before the layer it reads its input from; the FFN "
                                    "does not run its input layer first. Place it with targets=[...] instead.")
        return value


class InputTap(Delta):
    """Records the site's input for the parallel adapter downstream; changes nothing."""

    form = "parallel"

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        self.tap.value = x
        return x

    @property
    def weightable(self) -> bool:  # it adds nothing, so a weight on the adapter is fine
        return True


class ParallelAdapter(Delta):
    """``s · f(x)`` added to the site's output; x is the site's input, or the tap's."""

    form = "parallel"

    def __init__(self, d_in: int, d_out: int, base: nn.Module, config: ParallelAdapterConfig, tap: Tap | None) -> None:
        super().__init__()
        m = bottleneck_size(d_in, config.bottleneck, config.reduction_factor)
        self.net = Bottleneck(d_in, m, d_out, config.activation, delta_dtype(base), device_of(base))
        nn.init.kaiming_uniform_(self.net.down.weight, a=math.sqrt(5))
        for tensor in (self.net.down.bias, self.net.up.weight, self.net.up.bias):
            nn.init.zeros_(tensor)
        self.scale = config.scale
        self.tap = tap

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        source = self.tap.take() if self.tap is not None else x
        return self.scale * self.net(source)


def _io_dims(module: nn.Module, site: str) -> tuple[int, int]:
    if is_linear(module):
        return linear_dims(module)
    linears = [m for m in module.modules() if is_linear(m)]
    if not linears:
        raise TargetError(f"cannot tell the input/output size of {site} ({type(module).__name__}); "
                          "target linear layers or modules built from them.")
    return linear_dims(linears[0])[0], linear_dims(linears[-1])[1]


def build(model: nn.Module, config: ParallelAdapterConfig) -> Attachment:
    attachment = Attachment()
    if config.targets is not None:
        for site in select(model, config.targets, exclude=config.exclude, layers=config.layers):
            base = base_at(model, site)
            d_in, d_out = _io_dims(base, site)
            attachment.add(site, "parallel", ParallelAdapter(d_in, d_out, base, config, None))
        return attachment
    option = "targets=[...]"
    pairs = {}
    for roles in arch.blocks(model):
        out = arch.require(roles, "ffn_out", option)
        if not roles.ffn_in:
            raise TargetError(f"cannot find the FFN input layer in {roles.block}; set {option} explicitly.")
        pairs[out] = roles.ffn_in[0]
    for out in select(model, list(pairs), exclude=config.exclude, layers=config.layers):
        source, tap = pairs[out], Tap()
        attachment.add(source, "tap", InputTap(tap))
        d_in, d_out = linear_dims(base_at(model, source))[0], linear_dims(base_at(model, out))[1]
        attachment.add(out, "parallel", ParallelAdapter(d_in, d_out, base_at(model, out), config, tap))
    return attachment


register(MethodSpec(
    name="parallel_adapter",
    family="additive",
    config_cls=ParallelAdapterConfig,
    build=build,
    summary="Scaled bottleneck from the FFN input added to the FFN output, in parallel; identity at init.",
    identity_at_init=True,
))
