"""peftkit: parameter-efficient fine-tuning for PyTorch / Hugging Face models.

    import peftkit
    cfg = peftkit.config("lora", r=8, alpha=16, targets=["query", "value"])
    tuned = peftkit.attach(model, cfg)
    tuned.save("out/adapter")
    tuned = peftkit.load(model, "out/adapter")

Errors are in `peftkit.errors` (every one a `PeftkitError`); training in `peftkit.train`, quantized
and pruned bases in `peftkit.quant` and `peftkit.prune`.
"""

from __future__ import annotations

from . import errors
from . import methods as _methods  # noqa: F401  (registers every method)
from .core.loading import load
from .core.registry import config, methods
from .core.tuned import TunedModel, attach
from .errors import PeftkitError
from .quant import quantize
from .version import __version__

__all__ = ["PeftkitError", "TunedModel", "__version__", "attach", "config", "errors", "load", "methods", "quantize"]
