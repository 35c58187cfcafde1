"""Pruning the frozen base: magnitude (unstructured, N:M) and structured (attention heads, FFN channels).

    from peftkit import prune
    report = prune.magnitude_prune(model, 0.5)      # or prune.nm_prune(model, 2, 4)
    report = prune.prune_heads(model, 0.25)         # or prune.prune_channels(model, fraction=0.5)
    print(report)                                    # sparsity and parameter counts
    prune.save_pruned(model, "out/pruned", report)   # reload with prune.load_pruned("out/pruned")
    tuned = peftkit.attach(model, peftkit.config("lora"))   # then recover quality with any method

Every function changes the model in place and returns a `PruneReport`.
"""

from __future__ import annotations

from .files import PrunedModelError, load_pruned, save_pruned
from .report import LayerStats, PruneReport, count_params, sparsity_report
from .structured import prune_channels, prune_heads
from .unstructured import magnitude_prune, nm_prune

__all__ = ["LayerStats", "PruneReport", "PrunedModelError", "count_params", "load_pruned", "magnitude_prune",
           "nm_prune", "prune_channels", "prune_heads", "save_pruned", "sparsity_report"]
