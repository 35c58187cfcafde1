"""LoRA, rsLoRA and DoRA.

LoRA (Hu et al., ICLR 2022): ``y = W₀x + b + s·B·A·dropout(x)`` with A ∈ R^{r×in}, B ∈ R^{out×r}
and ``s = α/r``; rsLoRA (Kalajdzievski, 2023) uses ``s = α/√r``. DoRA (Liu et al., ICML 2024)
decomposes the adapted weight into magnitude and direction:
``W' = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖_row``, m initialised to ‖W₀‖ per output row, the norm detached.

Placement: any linear layer (``nn.Linear``, GPT-2 ``Conv1D``) or ``nn.Embedding``; by default the
attention query and value projections (the fused qkv projection on GPT-2). Init: A Kaiming-uniform
(a=√5), B = 0, so the model is unchanged at init (``init="gaussian"``: A ~ N(0, 1/r);
``init="random"``: B random too, not an identity). Embeddings: A = 0, B ~ N(0, 1).
Defaults: r=8, alpha=16, dropout=0. Mergeable: ``W += s·B·A`` (DoRA: W = m ⊙ V/‖V‖).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import arch
from ...core.config import MAX_SIZE, SiteConfig, flag, is_int, is_number, mapping, number, one_of, size
from ...core.forms.select import BiasShift
from ...core.linear import (
    assign_linear_weight,
    compute_dtype,
    delta_dtype,
    device_of,
    is_linear,
    linear_dims,
    linear_weight,
)
from ...core.protocol import Delta
from ...core.rebuild import Rebuilder
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import base_at, head_names, iter_sites, matches, select
from ...errors import ConfigError, TargetError
from .lora_hf import LORA_CODEC
from .lora_kernel import SharedInput, down, up

INITS = ("kaiming", "gaussian", "random")
BIASES = ("none", "lora_only", "all")


@dataclass(frozen=True)
class LoraConfig(SiteConfig):
    """Options of ``lora``. `rank_pattern` / `alpha_pattern` map a target entry (suffix or
    ``re:`` regex) to a per-module r / alpha; the first matching key wins."""

    method = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def problems(self):
        yield from size("r", self.r)
        yield from number("alpha", self.alpha, "> 0", lambda a: a > 0)
        yield from number("dropout", self.dropout, "in [0, 1)", lambda p: 0 <= p < 1)
        yield from flag("rslora", self.rslora)
        yield from flag("dora", self.dora)
        yield from one_of("init", self.init, INITS)
        yield from one_of("bias", self.bias, BIASES)
        yield from mapping("rank_pattern", self.rank_pattern, f"ranks in [1, {MAX_SIZE}]",
                                   lambda r: is_int(r) and 0 < r <= MAX_SIZE)
        yield from mapping("alpha_pattern", self.alpha_pattern, "numbers > 0", lambda a: is_number(a) and a > 0)

    def rank_alpha(self, site: str) -> tuple[int, float]:
        r = next((v for k, v in self.rank_pattern.items() if matches(k, site)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if matches(k, site)), self.alpha)
        return r, alpha

    def scaling(self, site: str) -> float:
        r, alpha = self.rank_alpha(site)
        return alpha / (math.sqrt(r) if self.rslora else r)


class LoraLinear(Delta):
    """Low-rank update of a linear layer (``nn.Linear`` / ``Conv1D`` / quantized linear)."""

    form = "reparam"
    mergeable = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, dora: bool, init: str) -> None:
        super().__init__()
        in_f, out_f = linear_dims(base)
        kw: dict[str, Any] = {"dtype": delta_dtype(base), "device": device_of(base)}
        self.A = nn.Parameter(torch.empty(r, in_f, **kw))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_f, r, **kw))  # (out, r)
        self.scaling = scaling
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared: SharedInput | None = None  # set by `build` for projections that read one input
        self.rebuilder: Rebuilder | None = None  # set by `build`: rebuilds x in backward instead of keeping it
        if init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        if dora:
            with torch.no_grad():
                self.magnitude = nn.Parameter(self._adapted_weight(base).norm(dim=1))  # (out,)
        else:
            self.magnitude = None

    def _adapted_weight(self, base: nn.Module) -> torch.Tensor:
        weight = linear_weight(base).to(self.A.dtype)  # (out, in)
        return weight + self.scaling * (self.B @ self.A)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """h = dropout(x)·Aᵀ, computed with the projections that read the same x when there are some."""
        if self.shared is not None:
            return self.shared.take(self, x)
        return down(x, [self.A], self.dropout_p, self.training, rebuilder=self.rebuilder)[0]

    def _up(self, out: torch.Tensor | None, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return up(out, self._down(x), self.B, self.scaling, overwrite=overwrite)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor, *,
               overwrite: bool = False) -> torch.Tensor:
        if self.magnitude is None and out.dtype == compute_dtype(self.A.device, self.A.dtype) and not torch.compiler.is_compiling():
            return self._up(out, x, overwrite)
        return super().add_to(out, x, base, base_out)

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        if self.magnitude is None and torch.compiler.is_compiling():
            # the compiler fuses the plain expression itself; the eager kernel's state and RNG would break its graph
            return F.linear(F.linear(self.dropout(x.to(self.A.dtype)), self.A), self.B) * self.scaling
        if self.magnitude is None:
            return self._up(None, x)
        x = x.to(self.A.dtype)
        dropped = self.dropout(x)
        lora = F.linear(F.linear(dropped, self.A), self.B) * self.scaling
        norm = self._adapted_weight(base).norm(dim=1).detach()  # (out,) no gradient through the norm
        scale = self.magnitude / norm
        if isinstance(self.dropout, nn.Identity):
            bias = getattr(base, "bias", None)
            plain = base_out.to(x.dtype) - (bias.to(x.dtype) if isinstance(bias, torch.Tensor) else 0)
        else:
            plain = F.linear(dropped, linear_weight(base).to(x.dtype))
        return (scale - 1) * plain + scale * lora

    def fold(self, base: nn.Module) -> None:
        weight = self._adapted_weight(base)
        if self.magnitude is not None:
            weight = weight * (self.magnitude / weight.norm(dim=1)).unsqueeze(1)
        assign_linear_weight(base, weight)


class LoraEmbedding(Delta):
    """Low-rank update of an embedding table: ``E' = E + s·(B·A)ᵀ`` (A: (r, num), B: (dim, r))."""

    form = "reparam"
    mergeable = True

    def __init__(self, base: nn.Embedding, r: int, scaling: float, init: str) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": delta_dtype(base), "device": base.weight.device}
        self.A = nn.Parameter(torch.zeros(r, base.num_embeddings, **kw))
        self.B = nn.Parameter(torch.randn(base.embedding_dim, r, **kw))
        if init == "random":
            nn.init.normal_(self.A)
        self.scaling = scaling

    def contribution(self, ids: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.A.T, padding_idx=base.padding_idx)  # (..., r)
        return (rows @ self.B.T) * self.scaling

    def fold(self, base: nn.Module) -> None:
        base.weight.add_((self.scaling * (self.B @ self.A)).T.to(base.weight.dtype))


def _supported(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def _own_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def build(model: nn.Module, config: LoraConfig) -> Attachment:
    targets = config.targets if config.targets is not None else arch.projections(model, "query", "value")
    sites = select(model, targets, exclude=config.exclude, layers=config.layers, accept=_supported,
                   accept_label="Linear, Conv1D and Embedding layers")
    attachment = Attachment()
    for site in sites:
        base = base_at(model, site)
        r, _ = config.rank_alpha(site)
        if isinstance(base, nn.Embedding):
            if config.dora:
                raise ConfigError(f"DoRA on embeddings is not supported (site {site}); drop that target or dora=True.")
            attachment.add(site, "lora", LoraEmbedding(base, r, config.scaling(site), config.init))
        else:
            attachment.add(site, "lora", LoraLinear(base, r, config.scaling(site), config.dropout, config.dora,
                                                    config.init))
        if config.bias == "lora_only" and _own_bias(base):
            attachment.add(site, "bias", BiasShift(base))
    if config.bias == "all":
        heads = set(head_names(model))
        for site, module in iter_sites(model):
            if _own_bias(module) and site.split(".")[0] not in heads:
                attachment.add(site, "bias", BiasShift(module))
    _share_inputs(model, {site: slots["lora"] for site, slots in attachment.sites.items()
                          if isinstance(slots.get("lora"), LoraLinear) and slots["lora"].magnitude is None})
    rebuilder = Rebuilder(model)
    for slots in attachment.sites.values():
        if isinstance(slots.get("lora"), LoraLinear):
            slots["lora"].rebuilder = rebuilder
    return attachment


def _share_inputs(model: nn.Module, deltas: dict[str, LoraLinear]) -> None:
    """Group the deltas at projections that read one input — query, key and value of an attention; the
    FFN's input side within one module (gate and up) — so that they run as one (`SharedInput`)."""
    try:
        blocks = arch.blocks(model)
    except TargetError:  # no transformer structure: every delta runs alone
        return
    for roles in blocks:
        ffn_in = [n for n in roles.ffn_in if n.rpartition(".")[0] == roles.ffn]
        for names in (roles.query + roles.key + roles.value, ffn_in):
            members = [deltas[n] for n in names if n in deltas]
            if len(members) > 1 and len({m.A.shape[1] for m in members}) == 1:
                group = SharedInput(members)
                for member in members:
                    member.shared = group


register(MethodSpec(
    name="lora",
    family="reparameterized",
    config_cls=LoraConfig,
    build=build,
    summary="Low-rank update B·A of linear/embedding weights (rsLoRA, DoRA options); mergeable.",
    hf=LORA_CODEC,
    identity_at_init=True,
    # QLoRA's finding: LoRA on every linear layer is needed to match full fine-tuning (here too, for a
    # little more step time than query/value alone).
    recipe={"options": {"targets": "all-linear"}},
))
