"""Evaluation metrics from sufficient statistics (so data-parallel shards can be summed)."""

from __future__ import annotations

import math

import torch


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix ``[true, predicted]`` of counts.

    Macro-F1 averages over the classes that occur in the labels or the predictions.
    """
    confusion = confusion.double()
    total = float(confusion.sum())
    tp = confusion.diag()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp_min(1e-12), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "examples": int(total),
    }


def lm_metrics(loss: float) -> dict[str, float]:
    """Mean token loss and perplexity (capped to stay finite in JSON)."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
