"""AdaLoRA: adaptive budget allocation over SVD-form low-rank updates.

Paper: Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023.
Formula: ``y = W₀x + b + s·P·Λ·Q·dropout(x)`` with Q ∈ R^{r×in} (tensor ``A``), Λ = diag(E)
(``E`` ∈ R^r) and P ∈ R^{out×r} (``B``); ``s = α/(init_r + 1e-5)`` — the constant of the official
code and of PEFT (which divides by ``ranknum`` = init_r even after pruning), kept so that files
interoperate exactly. Orthogonality regulariser, added to the loss while training:
``γ · mean over all P and Q of (‖QQᵀ − I‖_F, ‖PᵀP − I‖_F)``.

Placement: linear layers (``nn.Linear``, GPT-2 ``Conv1D``); by default the attention query and
value projections. Init: Λ = 0 (identity at init), P, Q ~ N(0, 0.02). Ranks are reallocated
during training by `adalora_budget.RankAllocator` through ``tuned.update(step)``: call it after
every ``optimizer.step()`` and before ``zero_grad()`` (peftkit's trainer and its HF callback do),
with `step` the 0-based index of the step just taken.

Defaults: init_r=12, target_r=8 (average final rank; or ``budget`` = total final ranks), alpha=32,
t_init=0, t_final=0, delta_t=10, beta1=beta2=0.85, orth_reg=0.1; ``total_steps`` must be given.
The keep-mask is adapter state; once the final allocation is made, saved files hold only the
surviving ranks plus the mask, and load back exactly. `convert_to_lora` turns a trained adapter
into a plain ``lora`` adapter of the surviving ranks. Mergeable: ``W += s·P·Λ·Q``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import arch
from ...core.config import SiteConfig, check, integer, is_int, number, size
from ...core.linear import assign_linear_weight, delta_dtype, device_of, is_linear, linear_dims, linear_weight
from ...core.protocol import Delta
from ...core.registry import Attachment, MethodSpec, register
from ...core.registry import config as make_config
from ...core.targets import base_at, select
from ...core.tuned import TunedModel
from ...errors import AdapterStateError, ConfigError, shown
from .adalora_budget import RankAllocator
from .adalora_hf import ADALORA_CODEC

SLOT = "adalora"
RANKNUM_EPS = 1e-5  # PEFT / official code: scaling / (ranknum + 1e-5)


@dataclass(frozen=True)
class AdaLoraConfig(SiteConfig):
    """Options of ``adalora``. `budget` (total singular values kept at the end), when set,
    replaces ``target_r × number of sites``."""

    method = "adalora"
    init_r: int = 12
    target_r: float = 8
    budget: int | None = None
    total_steps: int | None = None
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    alpha: float = 32
    dropout: float = 0.0

    def problems(self):
        yield from size("init_r", self.init_r)
        if self.budget is None:
            yield from number("target_r", self.target_r, f"in (0, init_r={shown(self.init_r)}]",
                              lambda t: 0 < t <= (self.init_r if is_int(self.init_r) else 0))
        yield from integer("budget", self.budget, optional=True, note=" (total ranks kept)")
        yield from check(is_int(self.total_steps) and self.total_steps > 0,
                         f"total_steps must be the number of optimizer steps you will train (a positive integer), "
                         f"got {shown(self.total_steps)}; AdaLoRA's budget schedule needs it")
        yield from integer("t_init", self.t_init, 0)
        yield from integer("t_final", self.t_final, 0)
        yield from integer("delta_t", self.delta_t)
        if is_int(self.total_steps) and is_int(self.t_init) and is_int(self.t_final):
            yield from check(self.t_init < self.total_steps - self.t_final,
                             f"t_init={self.t_init} and t_final={self.t_final} leave no budgeting phase in "
                             f"total_steps={self.total_steps}; decrease them or increase total_steps")
        yield from number("beta1", self.beta1, "in (0, 1)", lambda b: 0 < b < 1)
        yield from number("beta2", self.beta2, "in (0, 1)", lambda b: 0 < b < 1)
        yield from number("orth_reg", self.orth_reg, ">= 0", lambda w: w >= 0)
        yield from number("alpha", self.alpha, "> 0", lambda a: a > 0)
        yield from number("dropout", self.dropout, "in [0, 1)", lambda p: 0 <= p < 1)

    def target_budget(self, n_sites: int) -> int:
        """Total singular values kept at the end of training over `n_sites` sites."""
        return self.budget if self.budget is not None else max(1, round(self.target_r * n_sites))

    @property
    def scaling(self) -> float:
        return self.alpha / (self.init_r + RANKNUM_EPS)


class AdaLoraLinear(Delta):
    """SVD-form update ``s·P·diag(E)·Q`` of a linear layer, with a keep-mask over the r triplets.

    Until the final allocation the masked triplets stay (their singular value zeroed, so they can
    come back) and files hold all r ranks plus the mask, so training resumes exactly. From the
    final allocation on (`prune`) — or after loading a pruned file — they are dropped: files hold
    only the kept ranks and the orthogonality term covers only those.
    """

    form = "reparam"
    mergeable = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, orth_weight: float) -> None:
        super().__init__()
        in_f, out_f = linear_dims(base)
        kw: dict[str, Any] = {"dtype": delta_dtype(base), "device": device_of(base)}
        self.A = nn.Parameter(torch.randn(r, in_f, **kw) * 0.02)  # Q: (r, in), right singular vectors
        self.E = nn.Parameter(torch.zeros(r, **kw))  # Λ: (r,) singular values
        self.B = nn.Parameter(torch.randn(out_f, r, **kw) * 0.02)  # P: (out, r), left singular vectors
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=kw["device"]))
        self.pruned = False
        self.scaling = scaling
        self.orth_weight = orth_weight  # γ / (number of P and Q matrices in the adapter)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def r(self) -> int:
        return self.E.shape[0]

    @property
    def rank(self) -> int:
        """Triplets currently kept."""
        return int(self.mask.sum())

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x.to(self.A.dtype)), self.A * self.E.unsqueeze(1))  # (..., r)
        return F.linear(h, self.B) * self.scaling

    def fold(self, base: nn.Module) -> None:
        weight = linear_weight(base).to(self.A.dtype)  # (out, in)
        assign_linear_weight(base, weight + self.scaling * (self.B @ (self.A * self.E.unsqueeze(1))))

    def regularizer(self) -> torch.Tensor | None:
        if self.orth_weight == 0:
            return None
        A, B = (self.A[self.mask], self.B[:, self.mask]) if self.pruned else (self.A, self.B)  # (k, in), (out, k)
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        return self.orth_weight * (torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye))

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep.to(self.mask.device))

    def prune(self) -> None:
        """Drop the masked triplets for good (the final allocation)."""
        self.pruned = True

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the masked singular values (their vectors stay, so they can come back until `prune`)."""
        self.E.masked_fill_(~self.mask, 0.0)

    def export_state(self) -> dict[str, torch.Tensor]:
        keep = self.mask if self.pruned else slice(None)
        return {"A": self.A.detach()[keep], "B": self.B.detach()[:, keep], "E": self.E.detach()[keep],
                "mask": self.mask.detach().clone()}

    def state_shapes(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Full (r ranks) or pruned (the mask's k ranks), whichever the incoming `A` holds."""
        mask, A = state.get("mask"), state.get("A")
        valid = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (self.r,)
        k = int(mask.sum()) if valid else self.r
        if isinstance(A, torch.Tensor) and A.ndim == 2 and A.shape[0] == self.r:
            k = self.r
        return {"A": (k, self.A.shape[1]), "B": (self.B.shape[0], k), "E": (k,), "mask": (self.r,)}

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        keep = state["mask"].to(self.mask.device)
        self.pruned = state["A"].shape[0] != self.r
        rows = keep if self.pruned else slice(None)
        self.A[rows] = state["A"].to(self.A)
        self.B[:, rows] = state["B"].to(self.B)
        self.E.zero_()
        self.E[rows] = state["E"].to(self.E)
        self.mask.copy_(keep)


def build(model: nn.Module, config: AdaLoraConfig) -> Attachment:
    targets = config.targets if config.targets is not None else arch.projections(model, "query", "value")
    sites = select(model, targets, exclude=config.exclude, layers=config.layers, accept=is_linear,
                   accept_label="Linear and Conv1D layers")
    budget, initial = config.target_budget(len(sites)), config.init_r * len(sites)
    if budget > initial:
        raise ConfigError(f"the final budget ({budget} ranks) exceeds the initial one ({initial} = init_r "
                          f"{config.init_r} x {len(sites)} sites); lower target_r/budget or raise init_r.")
    orth_weight = config.orth_reg / (2 * len(sites))
    attachment = Attachment()
    for site in sites:
        base = base_at(model, site)
        attachment.add(site, SLOT, AdaLoraLinear(base, config.init_r, config.scaling, config.dropout, orth_weight))
    return attachment


def rank_pattern(tuned: TunedModel, name: str = "default") -> dict[str, int]:
    """Surviving ranks per site of AdaLoRA adapter `name`."""
    return {prefix.rsplit(".", 1)[0]: d.rank for prefix, d in tuned.deltas(name) if isinstance(d, AdaLoraLinear)}


def convert_to_lora(tuned: TunedModel, name: str = "default", *, new_name: str | None = None) -> TunedModel:
    """Replace AdaLoRA adapter `name` by a plain ``lora`` adapter of its surviving ranks.

    Per site with k kept triplets: ``A = (Λ·Q)[kept]`` (k, in), ``B = P[:, kept]`` (out, k),
    rank k and alpha chosen so the LoRA scale equals AdaLoRA's; sites with no survivor are dropped.
    Masked triplets are left out, so outputs are unchanged when their singular values are zero —
    which holds after ``tuned.update(step)``. With `new_name` the LoRA adapter is added beside the
    AdaLoRA one instead of replacing it. Returns `tuned`.

    Raises:
        ConfigError: `name` is not an AdaLoRA adapter, or no rank survived.
    """
    config = tuned.config_of(name)
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"adapter {name!r} is a {config.method!r} adapter; convert_to_lora takes an adalora one.")
    if name in tuned.merged_adapters:
        raise AdapterStateError(f"adapter {name!r} is merged; call tuned.unmerge_adapter() before converting it.")
    ranks: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    for prefix, delta in tuned.deltas(name):
        site = prefix.rsplit(".", 1)[0]
        if not isinstance(delta, AdaLoraLinear):  # task-head copies keep their tensors and slot
            state.update({f"{prefix}.{k}": v.clone() for k, v in delta.export_state().items()})
            continue
        keep = delta.mask
        if keep.any():
            ranks[site] = int(keep.sum())
            state[f"{site}.lora.A"] = (delta.A * delta.E.unsqueeze(1)).detach()[keep].clone()
            state[f"{site}.lora.B"] = delta.B.detach()[:, keep].clone()
    if not ranks:
        raise ConfigError(f"adapter {name!r} kept no singular value anywhere; there is nothing to convert.")
    lora = make_config("lora", **_lora_options(config, ranks))
    trainable = any(p.requires_grad for p in tuned.trainable_parameters(name))
    active, weights = tuned.active_adapters, tuned.adapter_weights
    target = new_name or name
    if new_name is None:
        tuned.delete(name)
    tuned.attach(lora, target, trainable=trainable, activate=False)
    tuned.load_adapter_state(target, state)
    if new_name is None and name in active:
        active = tuple(target if n == name else n for n in active)
        tuned.activate(active, [weights.get(n, 1.0) for n in active] if weights else None)
    return tuned


def _lora_options(config: AdaLoraConfig, ranks: dict[str, int]) -> dict[str, Any]:
    scale = config.scaling
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "r": r, "alpha": r * scale, "dropout": config.dropout, "targets": list(ranks),
        "rank_pattern": {s: k for s, k in ranks.items() if k != r},
        "alpha_pattern": {s: k * scale for s, k in ranks.items() if k != r},
        "trainable_modules": config.trainable_modules,
    }


def parameter_count(tuned: TunedModel, name: str = "default") -> int:
    """Parameters of the surviving triplets, ``Σ k·(in + out + 1)`` (what a pruned file holds)."""
    return sum(d.rank * (d.A.shape[1] + d.B.shape[0] + 1) for _, d in tuned.deltas(name)
               if isinstance(d, AdaLoraLinear))


register(MethodSpec(
    name="adalora",
    family="reparameterized",
    config_cls=AdaLoraConfig,
    build=build,
    summary="SVD-form low-rank update P·Λ·Q whose ranks are reallocated by importance during training; mergeable.",
    hf=ADALORA_CODEC,
    identity_at_init=True,
    controller=lambda config: RankAllocator(config, AdaLoraLinear),
    unshardable="its rank budget re-ranks singular values across all layers between steps",
))
