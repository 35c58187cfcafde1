"""Magnitude pruning of linear weights: unstructured (a sparsity level) and semi-structured N:M.

Unstructured (Han et al., 2015): zero the weights of smallest |w|, per layer (each layer at the
given sparsity) or globally (one threshold across all selected layers). N:M (e.g. 2:4, the pattern
sparse tensor cores run; Mishra et al., 2021): in every group of M consecutive weights along the
input dimension keep the N of largest magnitude. Shapes do not change: a pruned model saves and
loads as a plain model whose weights hold zeros. Biases are never pruned.

Pruning acts on the frozen base; a PEFT method trained on top recovers quality while the zeros stay
(merging a dense delta back in would fill them, so keep the adapter separate or prune after merging).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.linear import LINEAR_TYPES, assign_linear_weight, is_quantized, linear_weight
from ..core.targets import LayerSpec, Spec, iter_sites, select
from ..errors import ConfigError, TargetError
from .report import PruneReport, count_params, layer_stats

SCOPES = ("layer", "global")


def _layers(model: nn.Module, targets: Spec, exclude: Spec, layers: LayerSpec) -> dict[str, nn.Module]:
    names = select(model, targets, exclude=exclude, layers=layers,
                   accept=lambda m: isinstance(m, LINEAR_TYPES) or is_quantized(m), accept_label="linear layers")
    modules = dict(iter_sites(model))
    chosen = {n: modules[n] for n in names}
    quantized = [n for n, m in chosen.items() if is_quantized(m)]
    if quantized:
        raise TargetError(f"{quantized[0]} (and {len(quantized) - 1} more) are quantized; prune the full-precision "
                          "model first, then quantize it (zeros stay exact in every scheme).")
    return chosen


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float = 0.5, *, scope: str = "layer", targets: Spec = "all-linear",
                    exclude: Spec = None, layers: LayerSpec = None) -> PruneReport:
    """Zero the `sparsity` fraction of smallest-magnitude weights of the selected linear layers, in place.

    Raises:
        ConfigError: sparsity outside [0, 1) or an unknown scope.
        TargetError: targets that match no linear layer, or quantized layers.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    params_before = count_params(model)
    chosen = _layers(model, targets, exclude, layers)
    if scope == "global":
        scores = torch.cat([linear_weight(m).abs().flatten().float() for m in chosen.values()])
        k = int(sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k > 0 else scores.new_tensor(-1.0)
    for module in chosen.values():
        weight = linear_weight(module)
        if scope == "layer":
            k = int(sparsity * weight.numel())
            if k == 0:
                continue
            order = weight.abs().flatten().argsort()  # ties broken by position: exactly k zeros per layer
            mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[order[:k]] = False
            mask = mask.view_as(weight)
        else:
            mask = weight.abs().float() > threshold
        assign_linear_weight(module, weight * mask)
    return PruneReport(f"magnitude {sparsity:.0%} ({scope})", params_before, count_params(model),
                       layer_stats(model, list(chosen)), {"target_sparsity": sparsity, "scope": scope})


@torch.no_grad()
def nm_prune(model: nn.Module, n: int = 2, m: int = 4, *, targets: Spec = "all-linear", exclude: Spec = None,
             layers: LayerSpec = None) -> PruneReport:
    """Keep the `n` largest-magnitude weights in every group of `m` along each row's inputs, in place.

    Raises:
        ConfigError: n, m invalid, or a layer whose input size is not a multiple of m.
        TargetError: as `magnitude_prune`.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ConfigError(f"N:M pruning needs integers 0 < n < m, got {n}:{m}")
    params_before = count_params(model)
    chosen = _layers(model, targets, exclude, layers)
    ragged = [f"{name} ({linear_weight(mod).shape[1]} inputs)" for name, mod in chosen.items()
              if linear_weight(mod).shape[1] % m]
    if ragged:
        raise ConfigError(f"{n}:{m} pruning needs input sizes divisible by {m}: {', '.join(ragged[:3])}; "
                          "exclude those layers.")
    for module in chosen.values():
        weight = linear_weight(module)  # (out, in)
        groups = weight.reshape(weight.shape[0], -1, m)  # (out, in / m, m)
        keep = groups.abs().topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        assign_linear_weight(module, (groups * mask).reshape_as(weight))
    return PruneReport(f"{n}:{m} semi-structured", params_before, count_params(model),
                       layer_stats(model, list(chosen)), {"n": n, "m": m})
