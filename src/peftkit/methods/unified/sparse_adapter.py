"""SparseAdapter: any delta method, pruned once at initialisation by a fixed mask.

Paper: He, Ding, Dong, Zhang & Tao, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters", Findings of EMNLP 2022.
Formula: each weight tensor W of the base method's deltas becomes ``W ⊙ M`` with a fixed binary
mask M chosen at initialisation by a pruning score (``snip`` |g ⊙ W|, ``grasp``, ``magnitude``,
``random``; see `scores.py`), globally over all tensors or per tensor. Biases and other 1-D tensors
are not pruned. Removed weights are not stored (`mask.py`): they are exactly zero throughout
training, and the saved file holds only the kept values plus a bit-packed mask.

Options: ``base`` — the method whose deltas are masked (default ``adapter``; ``lora`` works too),
``base_options`` — its options (e.g. ``{"bottleneck": 128}``); ``sparsity`` — the fraction of
weights **removed** (0.8 keeps 20 %). Note: the paper's code calls the *kept* fraction
``--sparsity``. ``score`` (default ``snip``, as in the paper), ``scope`` (``global`` as in the
paper, or ``per-layer``), ``params`` (which tensors to prune; default every 2-D+ tensor), ``seed``.

"Large-Sparse": a bigger base at a higher sparsity with the same number of kept weights, e.g.
``adapter`` bottleneck 2m at 50 % (or 4m at 75 %) against a dense bottleneck m.

Data: ``magnitude`` / ``random`` prune while attaching. ``snip`` / ``grasp`` need a few batches:
``tuned.calibrate(batches)`` scores the dense adapter on them and prunes it, once,
before the optimizer is created (peftkit's trainer does this); until then the adapter refuses to
run or save. Note that weight-based scores give zero to zero-initialised tensors (LoRA's B).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core import registry
from ...core.config import MethodConfig, integer, mapping, number, one_of
from ...core.forms.mask import MaskedDelta, default_prunable
from ...core.protocol import Controller
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import Spec
from ...errors import AdapterStateError, ConfigError, PeftkitError, did_you_mean, shown
from . import scores as S

SCORES = ("snip", "grasp", "magnitude", "random")
DATA_SCORES = ("snip", "grasp")
SCOPES = ("global", "per-layer")


@dataclass(frozen=True)
class SparseAdapterConfig(MethodConfig):
    """Options of ``sparse_adapter``. `sparsity` is the fraction of weights removed."""

    method = "sparse_adapter"
    base: str = "adapter"
    base_options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.5
    score: str = "snip"
    scope: str = "global"
    params: Spec = None
    seed: int = 0

    def problems(self):
        yield from number("sparsity", self.sparsity, "in [0, 1) (the fraction of weights removed)",
                          lambda s: 0 <= s < 1)
        yield from one_of("score", self.score, SCORES)
        yield from one_of("scope", self.scope, SCOPES)
        bad_options = list(mapping("base_options", self.base_options, "the base method's option values"))
        yield from bad_options
        yield from integer("seed", self.seed, 0, high=2**63 - 1)
        if not isinstance(self.base, str) or self.base not in registry.methods():
            near = did_you_mean(self.base, registry.methods()) if isinstance(self.base, str) else ""
            yield f"base method {shown(self.base)} is not registered.{near} Registered: {', '.join(registry.methods())}"
        elif self.base == self.method:
            yield "base cannot be sparse_adapter itself"
        elif not bad_options:
            try:
                self.base_config()
            except PeftkitError as err:
                yield f"base_options: {err}"

    def base_config(self) -> MethodConfig:
        return registry.config(self.base, **{k: v for k, v in self.base_options.items() if k != "method"})


def masked_deltas(tuned: Any, name: str, owner: Any = None) -> list[MaskedDelta]:
    """The MaskedDeltas of adapter `name` (of one config, if `owner` is given), also inside wrappers
    (gates, compositions)."""
    return [m for _, d in tuned.deltas(name) for m in d.modules()
            if isinstance(m, MaskedDelta) and (owner is None or m.owner == owner)]


def _weights(deltas: Sequence[MaskedDelta]) -> dict[str, torch.Tensor]:
    return {f"{i}/{n}": d.dense(n) for i, d in enumerate(deltas) for n in d.prunable}


def _apply(deltas: Sequence[MaskedDelta], masks: dict[str, torch.Tensor]) -> None:
    for key, mask in masks.items():
        index, name = key.split("/", 1)
        deltas[int(index)].set_mask(name, mask)
    for d in deltas:
        d.awaiting = None


def prune_at_init(deltas: Sequence[MaskedDelta], config: SparseAdapterConfig) -> None:
    """Score (magnitude / random) and prune, from the initial weights alone."""
    with torch.no_grad():
        weights = _weights(deltas)
        scores = S.magnitude_scores(weights) if config.score == "magnitude" else S.random_scores(weights, config.seed)
    _apply(deltas, S.select_masks(scores, config.sparsity, config.scope, config.seed))


def build(model: nn.Module, config: SparseAdapterConfig) -> Attachment:
    inner = registry.get(config.base).build(model, config.base_config())
    if inner.model_deltas:
        raise ConfigError(f"base {config.base!r} adds model-level deltas ({', '.join(inner.model_deltas)}); "
                          "sparse masks apply to site deltas only. Choose a site method (adapter, lora, ...).")
    awaiting = config.score if config.score in DATA_SCORES else None
    attachment, deltas = Attachment(), []
    for site, slots in inner.sites.items():
        for slot, delta in slots.items():
            prunable = default_prunable(delta, config.params)
            if prunable:  # deltas with nothing to prune (norm copies, input taps) stay as they are
                delta = MaskedDelta(delta, prunable, awaiting, owner=config)
                deltas.append(delta)
            attachment.add(site, slot, delta)
    if not deltas:
        names = sorted({n for slots in inner.sites.values() for d in slots.values() for n, _ in d.named_parameters()})
        raise ConfigError(f"base {config.base!r} has no tensor to prune for params={config.params!r}; "
                          f"its deltas hold {names[:8]}.")
    if awaiting is None:
        prune_at_init(deltas, config)
    return attachment


@contextlib.contextmanager
def _scoring(tuned: Any, name: str, deltas: Sequence[MaskedDelta]) -> Iterator[None]:
    """`deltas`' values differentiable, and every masked part of the adapter running (dense while its
    own mask is pending). `TunedModel.calibrate` runs this adapter alone, in eval mode."""
    values = [d.kept_values(n) for d in deltas for n in d.prunable]
    flags = [v.requires_grad for v in values]
    everything = masked_deltas(tuned, name)
    for d in everything:
        d.calibrating = True
    for v in values:
        v.requires_grad_(True)
    try:
        yield
    finally:
        for d in everything:
            d.calibrating = False
        for v, flag in zip(values, flags, strict=True):
            v.requires_grad_(flag)


def _loss(tuned: Any, batch: dict[str, Any], loss_fn: Any) -> torch.Tensor:
    outputs = tuned(**batch)
    if loss_fn is not None:
        return loss_fn(outputs, batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise AdapterStateError("calibration batches must make the model return a loss (include labels), "
                                "or pass loss_fn=(outputs, batch) -> loss.")
    return loss


def prepare(model: nn.Module, config: SparseAdapterConfig) -> Callable[[], None] | None:
    """The base method's own base preparation, if any (e.g. ``qlora`` quantizing the base), and its undo."""
    spec = registry.get(config.base)
    return spec.prepare(model, config.base_config()) if spec.prepare is not None else None


class SparseController(Controller):
    """Holds the config; scores and prunes once on calibration data (snip / grasp)."""

    def __init__(self, config: SparseAdapterConfig) -> None:
        self.config = config

    def needs_calibration(self, tuned: Any, name: str) -> bool:
        return any(d.awaiting for d in masked_deltas(tuned, name, self.config))

    def calibrate(self, tuned: Any, name: str, batches: Any, loss_fn: Any = None) -> None:
        deltas = [d for d in masked_deltas(tuned, name, self.config) if d.awaiting]
        if not deltas:
            return
        keys = [f"{i}/{n}" for i, d in enumerate(deltas) for n in d.prunable]
        values = [deltas[int(k.split("/")[0])].kept_values(k.split("/", 1)[1]) for k in keys]

        def grads() -> list[torch.Tensor]:
            total = [torch.zeros_like(v) for v in values]
            for batch in batches:
                for t, g in zip(total, torch.autograd.grad(_loss(tuned, batch, loss_fn), values, allow_unused=True),
                                strict=True):
                    if g is not None:
                        t.add_(g)
            return total

        with _scoring(tuned, name, deltas):
            g = grads()
            if self.config.score == "grasp":
                g = S.hessian_gradient(values, g, grads)
        shapes = {k: deltas[int(k.split("/")[0])].mask(k.split("/", 1)[1]).shape for k in keys}
        flat = {k: t.view(shapes[k]) for k, t in zip(keys, g, strict=True)}
        weights = {k: v.detach().view(shapes[k]) for k, v in zip(keys, values, strict=True)}
        scores = S.grasp_scores(weights, flat) if self.config.score == "grasp" else S.snip_scores(weights, flat)
        _apply(deltas, S.select_masks(scores, self.config.sparsity, self.config.scope, self.config.seed))


register(MethodSpec(
    name="sparse_adapter",
    family="unified",
    config_cls=SparseAdapterConfig,
    build=build,
    prepare=prepare,
    summary="Any delta method pruned once at init (snip/grasp/magnitude/random, global or per-layer); "
            "stores kept weights + bitmask.",
    controller=SparseController,
    unshardable="its SNIP / GraSP masks are scored from gradients of whole weights before training",
))
