"""Sequential bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021).

``h ← h + W_up · act(W_down · h + b_down) + b_up`` applied to a sublayer's output, before the
residual add and normalisation. Placement ``"houlsby"``: after the attention output projection and
after the FFN output projection of every block, with the blocks' normalisation layers trained too;
``"pfeiffer"``: after the FFN output only. Sites come from `core.arch`; `targets` puts adapters
after any linear layers instead. Init: near identity, weights N(0, 1e-3²) truncated at 2σ, biases 0.
Defaults: bottleneck m = 64 (or hidden / `reduction_factor`), ReLU. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core import arch
from ...core.config import SiteConfig, flag, number, one_of
from ...core.forms.select import TrainableCopy
from ...core.linear import delta_dtype, device_of, is_linear, linear_dims
from ...core.protocol import Delta
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import base_at, select
from .bottleneck import Bottleneck, bottleneck_problems, bottleneck_size

PLACEMENTS = ("houlsby", "pfeiffer")


@dataclass(frozen=True)
class AdapterConfig(SiteConfig):
    """Options of ``adapter``. `train_norms` defaults to True for houlsby, False for pfeiffer."""

    method = "adapter"
    placement: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    train_norms: bool | None = None
    init_std: float = 1e-3

    def problems(self):
        yield from one_of("placement", self.placement, PLACEMENTS)
        yield from bottleneck_problems(self.bottleneck, self.reduction_factor, self.activation)
        yield from flag("train_norms", self.train_norms, optional=True)
        yield from number("init_std", self.init_std, ">= 0", lambda s: s >= 0)

    @property
    def norms_trained(self) -> bool:
        return self.placement == "houlsby" if self.train_norms is None else bool(self.train_norms)


class SequentialAdapter(Delta):
    """``y + f(y)`` on the site's output (f: a bottleneck with near-zero init)."""

    form = "sequential"

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        dim = linear_dims(base)[1]
        m = bottleneck_size(dim, config.bottleneck, config.reduction_factor)
        self.net = Bottleneck(dim, m, dim, config.activation, delta_dtype(base), device_of(base))
        std = config.init_std
        for layer in (self.net.down, self.net.up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)

    def transform_output(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.net(y).to(y.dtype)


def _placement(model: nn.Module, config: AdapterConfig) -> tuple[list[str], list[str]]:
    """(adapter sites, normalisation sites) of the configured placement."""
    option = "targets=[...]"
    sites, norms = [], []
    for roles in arch.blocks(model):
        if config.placement == "houlsby":
            sites.append(arch.require(roles, "attn_out", option))
        sites.append(arch.require(roles, "ffn_out", option))
        norms.extend(roles.norms)
    return sites, norms


def build(model: nn.Module, config: AdapterConfig) -> Attachment:
    if config.targets is None:
        targets, norms = _placement(model, config)
    else:
        targets = config.targets
        norms = [n for roles in arch.blocks(model) for n in roles.norms] if config.norms_trained else []
    sites = select(model, targets, exclude=config.exclude, layers=config.layers, accept=is_linear,
                   accept_label="Linear and Conv1D layers")
    attachment = Attachment()
    for site in sites:
        attachment.add(site, "adapter", SequentialAdapter(base_at(model, site), config))
    if config.norms_trained and norms:
        for site in select(model, norms, layers=config.layers):
            attachment.add(site, "norm", TrainableCopy(base_at(model, site)))
    return attachment


register(MethodSpec(
    name="adapter",
    family="additive",
    config_cls=AdapterConfig,
    build=build,
    summary="Sequential bottleneck adapters after attention/FFN outputs (Houlsby or Pfeiffer placement).",
))
