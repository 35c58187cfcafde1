"""A bench's settings: the model, the data and the budget every run of it shares.

Two benches with the same `identity` produce comparable records, so a folder holding one may be
continued (more methods, more seeds) by a bench with the same identity and by no other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig

DATA_FIELDS = ("model", "data", "eval_data", "eval_fraction", "task", "text_field", "label_field", "prompt_field",
               "response_field", "max_length", "batch_size", "precision")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Shared by every run of a bench. `max_steps` is each training run's step budget;
    `max_eval_examples` the held-out sample every run is scored on; `forgetting_data` /
    `forgetting_examples` what forgetting is measured on (None: chatterbot pairs for a classifier's
    retrieval, hamlet for a language model's perplexity)."""

    model: str = "minilm"
    data: str = "rotten-tomatoes"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    task: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_length: int | None = None
    batch_size: int | None = None
    precision: str = "auto"
    max_steps: int | None = None  # the budget fields are filled by `runner.make_plan` (flag, else preset)
    max_eval_examples: int | None = None
    forgetting_data: str | None = None
    forgetting_examples: int | None = None
    threads: int | None = None  # how fast, not what: left out of the identity

    def train_config(self, **changes: Any) -> TrainConfig:
        """The TrainConfig of a run of this bench, with `changes` (method, seed, out, ...)."""
        shared = {name: getattr(self, name) for name in DATA_FIELDS}
        return TrainConfig(**shared, max_steps=self.max_steps, max_eval_examples=self.max_eval_examples,
                           threads=self.threads, **changes)

    def identity(self) -> dict[str, Any]:
        """What makes two benches' records comparable (model and data files by absolute path)."""
        from ..train.assets import is_dataset_name
        from ..train.run import absolute_paths

        doc = {k: v for k, v in dataclasses.asdict(self).items() if k != "threads"}
        doc.update(absolute_paths(self.train_config()))
        probe = self.forgetting_data
        if probe and not is_dataset_name(probe) and Path(probe).expanduser().exists():
            doc["forgetting_data"] = str(Path(probe).expanduser().resolve())
        return doc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
