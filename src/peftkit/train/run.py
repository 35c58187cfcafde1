"""The main job as one function: config → data → model → adapter → train → evaluate → save.

Output folder (``--out``, default ``runs/<model>-<data>-<method>``):

- ``adapter/`` — the final adapter (peftkit format; ``peftkit.load(model, path)``);
- ``best/`` — the best evaluated adapter, when ``--eval-every`` is set;
- ``checkpoint/`` — the latest resumable checkpoint (``--resume``);
- ``run.json`` — the effective config (file paths made absolute), the held-out split, label names,
  metrics;
- ``metrics.jsonl`` — the training log.

A folder that holds a run is never started over silently: an unfinished one asks for ``--resume``,
a finished one for another ``--out`` or ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core import files, registry
from ..core.atomic import existing, write_json
from ..core.files import detect
from ..core.registry import config as method_config
from ..core.tuned import attach
from ..errors import ConfigError
from . import assets, fsdp, models
from . import data as data_mod
from .checkpoint import STATE, CheckpointError, read
from .config import FIELDS, METRICS, TrainConfig
from .distributed import Dist, setup, teardown
from .hf_logging import quiet_transformers
from .log import RunLog
from .output import check_writable
from .precision import base_dtype
from .precision import resolve as resolve_precision
from .trainer import FitResult, Trainer, resumed_pool

RUN_FILE = "run.json"
RUN_ENTRIES = ("adapter", "best", "checkpoint", "tensorboard", "metrics.jsonl", RUN_FILE)  # what a run writes


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
    fsdp.check_method(resolved.method, cfg.strategy)
    if cfg.strategy == "fsdp" and cfg.load_best:
        raise ConfigError("--load-best cannot put the best adapter back into a model sharded with --strategy fsdp; "
                          "leave it out and use <out>/best, or use --strategy ddp.")
    if cfg.format == "hf-peft" and registry.get(resolved.method).hf is None:
        raise ConfigError(f"method {resolved.method!r} has no Hugging Face PEFT layout; save it with --format "
                          "peftkit (the default).")
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
    if cfg.metric is not None and cfg.metric not in METRICS[task]:
        raise ConfigError(f"--metric {cfg.metric} is not measured for {task}; it reports "
                          f"{', '.join(METRICS[task])}: pick one of those.")
    if cfg.tensorboard:
        RunLog.check_tensorboard()
    if cfg.num_labels is not None and task != "classification":
        raise ConfigError(f"--num-labels is for classification; this run's task is {task}. Leave it out.")
    limit = models.position_limit(path)
    if limit is not None and cfg.max_length is not None and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} is longer than {cfg.model} can read ({limit} positions); "
                          f"pass --max-length {limit} or less.")
    cfg = dataclasses.replace(cfg, task=task, **absolute_paths(cfg)).resolved()
    if limit is not None and cfg.max_length > limit:  # the task's default is longer than this model reads
        cfg = dataclasses.replace(cfg, max_length=limit)
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.resume not in (None, "", "auto"):
        out = checkpoint_folder(Path(cfg.resume)).parent  # the resumed run's own folder
    else:
        out = default_out(cfg)
    return Job(cfg, str(Path(path).resolve()) if Path(path).is_dir() else path, task, src, eval_src, method_cfg, out)


def absolute_paths(cfg: TrainConfig) -> dict[str, str]:
    """The model and data settings that name local files, made absolute: run.json is read from anywhere."""
    out = {}
    for key, embedded in (("model", assets.is_model_name), ("data", assets.is_dataset_name),
                          ("eval_data", assets.is_dataset_name)):
        value = getattr(cfg, key)
        if value and not embedded(value) and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint that ``--resume PATH`` means: PATH, or PATH/checkpoint for a run folder."""
    return path / "checkpoint" if (path / "checkpoint" / STATE).is_file() else path


def _resume_folder(job: Job) -> Path | None:
    if job.cfg.resume is None:
        return None
    if job.cfg.resume in ("auto", ""):
        folder = job.out / "checkpoint"
    else:
        folder = checkpoint_folder(Path(job.cfg.resume))
        if not (folder / STATE).is_file():
            raise CheckpointError(f"{job.cfg.resume} holds no checkpoint; --resume takes a run folder (holding "
                                  "checkpoint/), a checkpoint folder, or nothing (for <out>/checkpoint).")
    read(folder)  # fails early, before anything is written
    return folder


def resumed_settings(resume: str) -> tuple[Path, dict[str, Any]] | None:
    """(run folder, recorded settings) of the run ``--resume`` continues, None when nothing is recorded.

    The settings come from the run's run.json, else from the checkpoint (which records them too); keys
    this version does not know are left out, and relative file paths of older runs are anchored."""
    if resume in ("auto", ""):
        return None
    folder = checkpoint_folder(Path(resume))
    if not (folder / STATE).is_file():
        return None
    run_dir = folder.parent
    doc = _read_json(run_dir / RUN_FILE) or {}
    config = doc.get("config") or (read(folder).get("run") or {}).get("config")
    if not isinstance(config, dict):
        return None
    config = _anchored({"config": config}, run_dir)["config"]
    return run_dir, {k: v for k, v in config.items() if k in FIELDS and k not in ("out", "resume", "overwrite")}


def _guard_out(job: Job, resume: Path | None) -> None:
    """Refuse to start over on top of a run: an unfinished one (its checkpoint would be lost) or a
    finished one (its adapter would be replaced), unless told to with ``overwrite``."""
    if resume is not None or job.cfg.overwrite:
        return
    out = job.out
    folder = existing(out / "checkpoint")  # or the complete copy a killed checkpoint write left aside
    if (folder / STATE).is_file():
        try:
            doc = read(folder)
        except CheckpointError:
            doc = {}
        if not doc.get("finished") and doc.get("step", 0) < doc.get("total_steps", 0):
            raise CheckpointError(f"{out} holds an unfinished run (step {doc['step']} of {doc['total_steps']}); "
                                  "pass --resume to continue it, choose another --out, or pass --overwrite to "
                                  "start over.")
    finished = detect(out / "adapter") is not None or "result" in (_read_json(out / RUN_FILE) or {})
    if finished:
        raise CheckpointError(f"{out} holds a finished run (its adapter/ and run.json would be replaced); choose "
                              "another --out, or pass --overwrite to replace it.")


def _clear_run(out: Path) -> None:
    """With ``overwrite``: the previous run's files go, so none of them is mistaken for this run's."""
    for name in RUN_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _quiet(_message: str) -> None:
    """What processes other than the main one print."""


def _warn(message: str) -> None:
    print(f"peftkit: warning: {message}", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, *, echo: Callable[[str], None] = print,
          warn: Callable[[str], None] = _warn) -> dict[str, Any]:
    """Run the main job; returns the result dict that ``--json`` prints. `echo` gets the progress
    lines, `warn` what the user should hear of (e.g. rows dropped from the data)."""
    job = plan(cfg)
    dist = setup(job.cfg.strategy)
    try:
        job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, precision=resolve_precision(
            job.cfg.precision, dist.device)))
        return _train(job, dist, echo if dist.main else _quiet, warn if dist.main else _quiet)
    finally:
        teardown(dist)


def _data(job: Job) -> tuple[Any, data_mod.Prepared]:
    cfg = job.cfg
    tok = models.tokenizer(job.model_path)
    prepared = data_mod.prepare(cfg, tok, job.task, job.source, job.eval_source)
    if cfg.num_labels is not None and prepared.num_labels is not None:
        if cfg.num_labels < prepared.num_labels:
            classes = data_mod.listing(prepared.label_names or list(range(prepared.num_labels)))
            raise ConfigError(f"--num-labels {cfg.num_labels} is fewer than the {prepared.num_labels} classes in "
                              f"{cfg.data} ({classes}); leave --num-labels out, or give at least "
                              f"{prepared.num_labels}.")
        prepared.num_labels = cfg.num_labels
    return tok, prepared


def _model(job: Job, dist: Dist, tok: Any, prepared: data_mod.Prepared) -> Any:
    cfg = job.cfg
    torch.manual_seed(cfg.seed)  # a new task head is initialised while loading: --seed must cover it
    model = _load_model(job, prepared.num_labels, tok.pad_token_id, structure_only=_from_rank0(job, dist)
                        and not dist.main)
    if cfg.base_dropout is not None:  # before attaching: the adapter's own dropout stays as configured
        models.set_dropout(model, cfg.base_dropout)
    torch.manual_seed(cfg.seed)
    tuned = attach(model, job.method_cfg)
    if not dist.sharded:  # FSDP moves each process's shards to its device
        tuned.to(dist.device)
    if cfg.gradient_checkpointing:
        tuned.gradient_checkpointing_enable()
    return tuned


def _prepare(job: Job, dist: Dist) -> tuple[Any, data_mod.Prepared, Any]:
    """(tokenizer, data, the model with the adapter attached)."""
    tok, prepared = _data(job)
    return tok, prepared, _model(job, dist, tok, prepared)


def _from_rank0(job: Job, dist: Dist) -> bool:
    """Whether only rank 0 reads the base (the others build its structure on the meta device and get
    their shards from rank 0: `fsdp.shard_from_rank0`): under fsdp, for a base read in full precision."""
    from ..quant import base_quantization

    return dist.sharded and not base_quantization(job.method_cfg, job.cfg.quantize)


def _load_model(job: Job, num_labels: int | None, pad_id: int | None, *,
                structure_only: bool = False) -> torch.nn.Module:
    """The base model; with --quantize (or a method that quantizes its base, like qlora) it is
    quantized while loading, tensor by tensor, so no full-precision copy is ever held.
    `structure_only`: on the meta device, no weights read."""
    from ..quant import base_quantization, load_quantized

    quant = base_quantization(job.method_cfg, job.cfg.quantize)
    if not quant:
        return models.load(job.model_path, job.task, num_labels, pad_id, dtype=base_dtype(job.cfg.precision),
                           meta=structure_only)
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


def _calibrate(tuned: Any, prepared: data_mod.Prepared, cfg: TrainConfig, pad_id: int, dist: Dist,
               resume: Path | None) -> list[str]:
    """Methods that set themselves up from data (e.g. SNIP / GraSP masks) see the first training
    batches, before the optimizer exists (the same batches on every process). A resumed run sees the
    batches it started with, so it sets itself up as it did then: the kept weights of a mask, and with them
    the shapes of the optimizer state in its checkpoint, follow from the batches."""

    if not tuned.needs_calibration:
        return []
    from .batches import collate, epoch_batches, pool_batches

    recorded = resumed_pool(read(resume), cfg.group_by_length) if resume is not None else None
    pool = recorded or pool_batches(prepared.train.per_token)
    order = epoch_batches(prepared.train.lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length,
                          pool=pool)
    batches = [{k: v.to(dist.device) for k, v in collate(prepared.train, index, pad_id).items()}
               for index in order[: cfg.calibration_batches]]
    torch.manual_seed(cfg.seed)
    return list(tuned.calibrate(batches))


def _train(job: Job, dist: Dist, echo: Callable[[str], None], warn: Callable[[str], None]) -> dict[str, Any]:
    cfg, out = job.cfg, job.out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resume = _resume_folder(job)
    check_writable(out)
    t_start = time.perf_counter()
    tok, prepared, tuned = _prepare(job, dist)
    _guard_out(job, resume)  # after every mistake in the data and method options has been reported
    calibrated = _calibrate(tuned, prepared, cfg, tok.pad_token_id, dist, resume)
    summary = tuned.summary()
    sharded = fsdp.shard_from_rank0(tuned, dist) if _from_rank0(job, dist) else None
    trainer = Trainer(tuned, prepared, cfg, out=out, pad_id=tok.pad_token_id, dist=dist, sharded=sharded,
                      save_best=(lambda: _save_adapter(trainer, out / "best")) if cfg.eval_every else None)
    if resume is not None:
        trainer.resume(resume)  # a checkpoint of another run is refused here, before run.json is touched
    # nothing is written before this point: a mistake in the input leaves the folder as it was
    for note in prepared.notes:
        warn(note)
    _announce(job, dist, prepared, summary, calibrated, echo)
    if cfg.overwrite and resume is None and dist.main:
        _clear_run(out)
    run_doc = {"config": cfg.to_dict(), "model_path": job.model_path, "data": prepared.meta,
               "label_names": prepared.label_names, "num_labels": prepared.num_labels, "world_size": dist.world,
               "strategy": dist.strategy}
    log = RunLog(out / "metrics.jsonl" if dist.main else None,
                 tensorboard=out / "tensorboard" if cfg.tensorboard and dist.main else None)
    trainer.log = log
    if dist.main:
        if resume is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        write_json(out / RUN_FILE, run_doc, default=str)
    before = _start(job, trainer, tuned, prepared, tok.pad_token_id, dist, resume, echo)
    result = trainer.fit()
    metrics = _final_metrics(job, trainer, tuned, result)
    adapter_dir = out / "adapter"
    _save_adapter(trainer, adapter_dir)
    log.close()
    adapter_bytes = models.folder_bytes(adapter_dir) if dist.main else 0
    echo("  after:  " + _fmt(metrics) + (" (stopped early)" if result.stopped_early else ""))
    echo("  " + _timing(result, time.perf_counter() - t_start))
    echo(f"  adapter: {adapter_dir} ({adapter_bytes / 1024:.1f} KiB)")
    doc = {"metrics": metrics, "metrics_before": before, "trainable_params": summary.trainable,
           "total_params": summary.total, "adapter_path": str(adapter_dir), "adapter_bytes": adapter_bytes,
           "train_seconds": round(result.train_seconds, 3), "steps": result.steps, "task": job.task,
           "method": cfg.method, "out": str(out), "best": result.best, "notes": prepared.notes,
           "model_bytes": fsdp.memory_share(tuned)[0]}  # parameters and buffers this process holds
    if dist.main:
        write_json(out / RUN_FILE, {**run_doc, "result": doc}, default=str)
    return doc


def _save_adapter(trainer: Trainer, folder: Path) -> None:
    """Rank 0 writes the trained adapter to `folder`; a sharded model's is gathered by every process first."""
    tuned, sharded = trainer.tuned, trainer.sharded
    view = fsdp.gathered(tuned, sharded) if sharded is not None else tuned
    if trainer.dist.main:
        files.save(view, folder, format=trainer.cfg.format)


def _announce(job: Job, dist: Dist, prepared: data_mod.Prepared, summary: Any, calibrated: list[str],
              echo: Callable[[str], None]) -> None:
    cfg = job.cfg
    echo(f"peftkit train: {cfg.model} on {cfg.data} ({job.task}), method {cfg.method}"
         + (f", {cfg.quantize} base" if cfg.quantize else "")
         + (f", base dropout {cfg.base_dropout:g}" if cfg.base_dropout is not None else "")
         + (f", {dist.world} processes ({dist.strategy})" if dist.enabled else ""))
    echo(f"  data: {prepared.meta['train_examples']} train / {prepared.meta['eval_examples']} held-out "
         f"({prepared.meta['split']})")
    echo(f"  trainable params: {summary.trainable:,} of {summary.total:,} ({summary.trainable_percent:.2f}%)")
    if calibrated:
        echo(f"  calibrated {', '.join(calibrated)} on {cfg.calibration_batches} training batches")


def _start(job: Job, trainer: Trainer, tuned: Any, prepared: data_mod.Prepared, pad_id: int, dist: Dist,
           resume: Path | None, echo: Callable[[str], None]) -> dict[str, float]:
    """Say where a resumed run (already restored) continues, or start fresh: fit a new head when the
    recipe says so, evaluate the start. Returns the metrics before training (empty when resuming or
    not evaluated)."""
    before: dict[str, float] = {}
    if resume is not None:
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
    found = detect(best_dir) if best_dir.is_dir() else None
    if job.cfg.load_best and best and best["step"] != result.steps and found is not None:
        tuned.load_adapter_state("default", found.read(tuned.model, best_dir, False)[1])
        return trainer.evaluate()
    return result.metrics


def _fmt(metrics: dict[str, float]) -> str:
    if not metrics:
        return "not evaluated (no held-out examples)"
    keys = [k for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _timing(result: FitResult, process_seconds: float) -> str:
    """The summary's time line. Training time spans the whole run, resumed or not, while the total is this
    process's, so after a resume the line says how many steps this process ran."""
    if not result.resumed_at:
        return f"train time: {result.train_seconds:.1f} s ({result.steps} steps); total {process_seconds:.1f} s"
    return (f"train time: {result.train_seconds:.1f} s ({result.steps} steps, resumed at step {result.resumed_at}); "
            f"this process: {result.steps - result.resumed_at} steps, {process_seconds:.1f} s in all")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _origins(run_dir: Path, out: Any) -> list[Path]:
    """Where a run's relative paths may start: the folder it was started from (its folder minus its
    --out), then the run folder and the folders above it."""
    here = run_dir.resolve()
    places = []
    if isinstance(out, str) and out and not Path(out).is_absolute():
        parts = Path(out).parts
        if here.parts[-len(parts):] == parts:
            places.append(Path(*here.parts[:-len(parts)]))
    return places + [Path.cwd(), here, *here.parents]


def _anchored(doc: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """`doc` (a run.json) with relative model / data paths, as older runs wrote them, made absolute."""
    config = dict(doc.get("config") or {})
    named = {"model": assets.is_model_name, "data": assets.is_dataset_name, "eval_data": assets.is_dataset_name}
    for key, embedded in named.items():
        value = config.get(key)
        if not isinstance(value, str) or not value or embedded(value) or Path(value).expanduser().is_absolute():
            continue
        found = next((base / value for base in _origins(run_dir, config.get("out")) if (base / value).exists()), None)
        if found is not None:
            config[key] = str(found.resolve())
    anchored = {**doc, "config": config}
    if isinstance(doc.get("model_path"), str) and not Path(doc["model_path"]).is_absolute():
        anchored["model_path"] = config.get("model", doc["model_path"])
    return anchored


def load_run(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The run.json next to an adapter folder (``<out>/adapter`` → ``<out>/run.json``), if any,
    with the relative file paths of older runs made absolute."""
    folder = Path(adapter_dir)
    for candidate in (folder / RUN_FILE, folder.parent / RUN_FILE):
        if candidate.is_file():
            doc = _read_json(candidate)
            return None if doc is None else _anchored(doc, candidate.parent)
    return None


__all__ = ["Job", "load_run", "plan", "resumed_settings", "train"]
