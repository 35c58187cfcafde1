"""Run log: one JSON object per line in ``<out>/metrics.jsonl`` (appended on resume), and
optionally TensorBoard scalars in ``<out>/tensorboard``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class RunLog:
    """Writes records on the main process only (`path` None: nothing is written)."""

    def __init__(self, path: Path | None, *, tensorboard: Path | None = None) -> None:
        self.path = path
        self.writer = None
        if tensorboard is not None:
            self.writer = self.check_tensorboard()(str(tensorboard))

    @staticmethod
    def check_tensorboard() -> Any:
        """TensorBoard's SummaryWriter class; a clear error when the package is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: `pip install tensorboard`.") from None
        return SummaryWriter

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            flat = {f"eval/{k}": v for k, v in record.get("eval", {}).items()}
            flat.update({f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "tokens_per_s")})
            for key, value in flat.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
