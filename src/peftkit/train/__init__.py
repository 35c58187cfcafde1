"""Training: peftkit's own trainer and data path, and `transformers.Trainer` integration.

    from peftkit.train import TrainConfig, train
    result = train(TrainConfig(model="minilm", data="rotten-tomatoes", method="lora"))

    # or inside transformers.Trainer:
    from peftkit.train import PeftkitCallback
    trainer = transformers.Trainer(model=tuned, args=args, train_dataset=ds, callbacks=[PeftkitCallback()])
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, parse_options
from .trainer import FitResult, Interrupted, Trainer


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the main job (see `peftkit.train.run.train`)."""
    from .run import train as _train

    return _train(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("PeftkitCallback", "PeftkitTrainer"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(name)


__all__ = ["FitResult", "Interrupted", "PeftkitCallback", "PeftkitTrainer", "TrainConfig", "Trainer",
           "parse_options", "train"]
