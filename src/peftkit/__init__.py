"""peftkit: parameter-efficient fine-tuning for PyTorch / Hugging Face models.

    import peftkit
    cfg = peftkit.config("lora", r=8, alpha=16, targets=["query", "value"])
    tuned = peftkit.attach(model, cfg)
    tuned.save("out/adapter")
    tuned = peftkit.load(model, "out/adapter")
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import methods as _methods  # noqa: F401,E402  (registers every method)
from .core.calibrate import calibrate, needs_calibration  # noqa: E402
from .core.config import MethodConfig  # noqa: E402
from .core.io import load  # noqa: E402
from .core.registry import config, config_from_dict, methods  # noqa: E402
from .core.tuned import Summary, TunedModel, attach  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    NotMergeableError,
    PeftkitError,
    TargetError,
)
from .quant import quantize  # noqa: E402

__all__ = [
    "AdapterFileError",
    "AdapterStateError",
    "ConfigError",
    "MethodConfig",
    "NotMergeableError",
    "PeftkitError",
    "Summary",
    "TargetError",
    "TunedModel",
    "__version__",
    "attach",
    "calibrate",
    "config",
    "config_from_dict",
    "load",
    "methods",
    "needs_calibration",
    "quantize",
]
