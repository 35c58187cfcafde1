"""The main job as one function: config → data → model → adapter → train → evaluate → save.

Output folder (``--out``, default ``runs/<model>-<data>-<method>``):

- ``adapter/`` — the final adapter (peftkit format; ``peftkit.load(model, path)``);
- ``best/`` — the best evaluated adapter, when ``--eval-every`` is set;
- ``checkpoint/`` — the latest resumable checkpoint (``--resume``);
- ``run.json`` — the effective config, the held-out split, label names, metrics;
- ``metrics.jsonl`` — the training log.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import existing, write_json
from ..core.files import peftkit_format
from ..core.registry import config as method_config
from ..core.tuned import attach
from ..errors import ConfigError
from . import data as data_mod
from . import models
from .checkpoint import CheckpointError, read
from .config import TrainConfig
from .distributed import Dist, setup, teardown
from .hf_logging import quiet_transformers
from .log import RunLog
from .trainer import Trainer

RUN_FILE = "run.json"


def default_out(cfg: TrainConfig) -> Path:
    def slug(s: str) -> str:
        return Path(s).stem if ("/" in s or "." in s) else s

    return Path("runs") / f"{slug(cfg.model)}-{slug(cfg.data)}-{cfg.method}"


@dataclasses.dataclass
class Job:
    """Everything resolved before anything is written: fails fast on bad input."""

    cfg: TrainConfig
    model_path: str
    task: str
    source: data_mod.Source
    eval_source: data_mod.Source | None
    method_cfg: Any
    out: Path


def plan(cfg: TrainConfig) -> Job:
    """Validate the config, find the model and data, build the method config. Writes nothing."""
    cfg.validate()
    resolved = cfg.resolved()
    method_cfg = method_config(resolved.method, **resolved.method_options)
    if cfg.quantize is not None and cfg.quantize not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"--quantize must be nf4, fp4 or int8, got {cfg.quantize!r}.")
    path = models.resolve(cfg.model)
    causal = models.is_causal(path)
    fields = {"text": cfg.text_field, "label": cfg.label_field, "prompt": cfg.prompt_field,
              "response": cfg.response_field}
    src = data_mod.load_source(cfg.data, fields)
    eval_src = data_mod.load_source(cfg.eval_data, fields) if cfg.eval_data else None
    task = data_mod.resolve_task(cfg, src, causal)
    if task in ("instruction", "lm") and not causal:
        raise ConfigError(f"task {task!r} needs a causal language model; {cfg.model} is an encoder. Use "
                          "--task classification, or a causal LM such as --model smollm2.")
    cfg = dataclasses.replace(cfg, task=task).resolved()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    return Job(cfg, path, task, src, eval_src, method_cfg, out)


def _resume_folder(job: Job) -> Path | None:
    if job.cfg.resume is None:
        return None
    folder = job.out / "checkpoint" if job.cfg.resume in ("auto", "") else Path(job.cfg.resume)
    read(folder)  # fails early, before anything is written
    return folder


def _guard_out(job: Job, resume: Path | None) -> None:
    """Refuse to start over on top of an unfinished run (its checkpoint would be lost)."""
    folder = existing(job.out / "checkpoint")  # or the copy a killed checkpoint write left aside
    if resume is not None or not (folder / "trainer.json").is_file():
        return
    try:
        doc = read(folder)
    except CheckpointError:
        return
    if not doc.get("finished") and doc.get("step", 0) < doc.get("total_steps", 0):
        raise CheckpointError(f"{job.out} holds an unfinished run (step {doc['step']} of {doc['total_steps']}); "
                              "pass --resume to continue it, or choose another --out.")


def train(cfg: TrainConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the main job; returns the result dict that ``--json`` prints."""
    job = plan(cfg)
    dist = setup()
    try:
        return _train(job, dist, echo if dist.main else (lambda _s: None))
    finally:
        teardown(dist)


def _prepare(job: Job, dist: Dist) -> tuple[Any, data_mod.Prepared, Any]:
    cfg = job.cfg
    tok = models.tokenizer(job.model_path)
    prepared = data_mod.prepare(cfg, tok, job.task, job.source, job.eval_source)
    if cfg.num_labels is not None and prepared.num_labels is not None:
        prepared.num_labels = max(prepared.num_labels, cfg.num_labels)
    torch.manual_seed(cfg.seed)  # a new task head is initialised while loading: --seed must cover it
    model = _load_model(job, prepared.num_labels, tok.pad_token_id)
    if cfg.base_dropout is not None:  # before attaching: the adapter's own dropout stays as configured
        models.set_dropout(model, cfg.base_dropout)
    torch.manual_seed(cfg.seed)
    tuned = attach(model, job.method_cfg)
    tuned.to(dist.device)
    if cfg.gradient_checkpointing:
        tuned.gradient_checkpointing_enable()
    return tok, prepared, tuned


def _load_model(job: Job, num_labels: int | None, pad_id: int | None) -> torch.nn.Module:
    """The base model; with --quantize (or a method that quantizes its base, like qlora) it is
    quantized while loading, tensor by tensor, so no full-precision copy is ever held."""
    from ..quant import base_quantization, load_quantized

    quant = base_quantization(job.method_cfg, job.cfg.quantize)
    if not quant:
        return models.load(job.model_path, job.task, num_labels, pad_id)
    task = "classification" if job.task == "classification" else "causal-lm"
    extra = {"num_labels": num_labels or 2} if task == "classification" else {}
    with quiet_transformers():
        model = load_quantized(job.model_path, task=task, **quant, **extra)
    if task == "classification" and pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # decoder classifiers pool the last non-pad token
    return model


def _probe(job: Job, tuned: Any, prepared: data_mod.Prepared, pad_id: int, dist: Dist) -> str:
    """Fit the task head first (train/probe.py) when it is new: a head the checkpoint holds is kept."""
    from .probe import head_site, probe_head

    saved = models.saved_weight_names(job.model_path)
    site = head_site(tuned.model)
    if saved is not None and site and any(name.startswith(f"{site}.") for name in saved):
        return f"task head {site!r} loaded from {job.model_path}: kept, not probed"
    return probe_head(tuned, prepared, pad_id, dist.device, job.cfg.seed)


def _calibrate(tuned: Any, prepared: data_mod.Prepared, cfg: TrainConfig, pad_id: int, dist: Dist) -> list[str]:
    """Methods that set themselves up from data (e.g. SNIP / GraSP masks) see the first training
    batches, before the optimizer exists (the same batches on every process)."""

    if not tuned.needs_calibration:
        return []
    from .batches import collate, epoch_batches, pool_batches

    order = epoch_batches(prepared.train.lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length,
                          pool=pool_batches(prepared.train.per_token))
    batches = [{k: v.to(dist.device) for k, v in collate(prepared.train, index, pad_id).items()}
               for index in order[: cfg.calibration_batches]]
    torch.manual_seed(cfg.seed)
    return list(tuned.calibrate(batches))


def _train(job: Job, dist: Dist, echo: Callable[[str], None]) -> dict[str, Any]:
    cfg, out = job.cfg, job.out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resume = _resume_folder(job)
    _guard_out(job, resume)
    t_start = time.perf_counter()
    tok, prepared, tuned = _prepare(job, dist)
    calibrated = _calibrate(tuned, prepared, cfg, tok.pad_token_id, dist)
    summary = tuned.summary()
    _announce(job, dist, prepared, summary, calibrated, echo)
    run_doc = {"config": cfg.to_dict(), "model_path": job.model_path, "data": prepared.meta,
               "label_names": prepared.label_names, "num_labels": prepared.num_labels, "world_size": dist.world}
    log = RunLog(out / "metrics.jsonl" if dist.main else None,
                 tensorboard=out / "tensorboard" if cfg.tensorboard and dist.main else None)
    if dist.main:
        if resume is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        write_json(out / RUN_FILE, run_doc, default=str)
    trainer = Trainer(tuned, prepared, cfg, out=out, pad_id=tok.pad_token_id, dist=dist, log=log,
                      save_best=(lambda: tuned.save(str(out / "best"))) if cfg.eval_every else None)
    before = _start(job, trainer, tuned, prepared, tok.pad_token_id, dist, resume, echo)
    result = trainer.fit()
    metrics = _final_metrics(job, trainer, tuned, result)
    adapter_dir = out / "adapter"
    if dist.main:
        tuned.save(str(adapter_dir))
    log.close()
    adapter_bytes = models.folder_bytes(adapter_dir) if dist.main else 0
    echo("  after:  " + _fmt(metrics) + (" (stopped early)" if result.stopped_early else ""))
    echo(f"  train time: {result.train_seconds:.1f} s ({result.steps} steps); total {time.perf_counter() - t_start:.1f} s")
    echo(f"  adapter: {adapter_dir} ({adapter_bytes / 1024:.1f} KiB)")
    doc = {"metrics": metrics, "metrics_before": before, "trainable_params": summary.trainable,
           "total_params": summary.total, "adapter_path": str(adapter_dir), "adapter_bytes": adapter_bytes,
           "train_seconds": round(result.train_seconds, 3), "steps": result.steps, "task": job.task,
           "method": cfg.method, "out": str(out), "best": result.best}
    if dist.main:
        write_json(out / RUN_FILE, {**run_doc, "result": doc}, default=str)
    return doc


def _announce(job: Job, dist: Dist, prepared: data_mod.Prepared, summary: Any, calibrated: list[str],
              echo: Callable[[str], None]) -> None:
    cfg = job.cfg
    echo(f"peftkit train: {cfg.model} on {cfg.data} ({job.task}), method {cfg.method}"
         + (f", {cfg.quantize} base" if cfg.quantize else "")
         + (f", base dropout {cfg.base_dropout:g}" if cfg.base_dropout is not None else "")
         + (f", {dist.world} processes" if dist.enabled else ""))
    echo(f"  data: {prepared.meta['train_examples']} train / {prepared.meta['eval_examples']} held-out "
         f"({prepared.meta['split']})")
    echo(f"  trainable params: {summary.trainable:,} of {summary.total:,} ({summary.trainable_percent:.2f}%)")
    if calibrated:
        echo(f"  calibrated {', '.join(calibrated)} on {cfg.calibration_batches} training batches")


def _start(job: Job, trainer: Trainer, tuned: Any, prepared: data_mod.Prepared, pad_id: int, dist: Dist,
           resume: Path | None, echo: Callable[[str], None]) -> dict[str, float]:
    """Resume from `resume`, or start fresh: fit a new head when the recipe says so, evaluate the start.
    Returns the metrics before training (empty when resuming or not evaluated)."""
    before: dict[str, float] = {}
    if resume is not None:
        trainer.resume(resume)
        echo(f"  resumed from {resume} at step {trainer.state['step']} of {trainer.total_steps}")
    else:
        if job.cfg.probe_head and job.task == "classification":
            echo("  " + _probe(job, tuned, prepared, pad_id, dist))
        if job.cfg.eval_before is not False:
            before = trainer.evaluate()
            if before:
                echo("  before: " + _fmt(before))
    echo(f"  training {trainer.total_steps} steps of {trainer.global_batch} examples "
         f"({trainer.steps_per_epoch} steps per epoch)")
    return before


def _final_metrics(job: Job, trainer: Trainer, tuned: Any, result: Any) -> dict[str, float]:
    """The last evaluation, or with ``--load-best`` the best adapter put back and evaluated."""
    best_dir = job.out / "best"
    best = result.best
    if job.cfg.load_best and best and best["step"] != result.steps and (best_dir / peftkit_format.META).is_file():
        tuned.load_adapter_state("default", peftkit_format.read_state(best_dir))
        return trainer.evaluate()
    return result.metrics


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def load_run(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The run.json next to an adapter folder (``<out>/adapter`` → ``<out>/run.json``), if any."""
    folder = Path(adapter_dir)
    for candidate in (folder / RUN_FILE, folder.parent / RUN_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


__all__ = ["Job", "load_run", "plan", "train"]
