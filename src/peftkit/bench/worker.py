"""One bench job, start to record: the base model's measures, a training run, or a prompted baseline.

A bench runs each job in a fresh process (``python -m peftkit.bench.worker JOB``), so the peak
resident memory it reports is that run's alone and a run that crashes leaves the bench going; the
job writes its own record, atomically, when it is done. Training goes through peftkit's trainer
(`peftkit.train.run.train`); an interrupted run's checkpoint is resumed by the next attempt.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..core.atomic import write_json
from ..train import data as data_mod
from ..train import models
from ..train.checkpoint import STATE, CheckpointError, read
from ..train.config import TrainConfig
from ..train.run import plan, train
from ..version import __version__
from . import forgetting, memory, prompted
from .record import BenchError, read_json, save_record
from .settings import BenchSettings
from .spec import RunSpec

TRAINED = "bench-train.json"  # in a run's folder: its training result, written when training ends


def _quiet(_message: str) -> None:
    """The trainer's progress lines: the bench shows its own."""


def _setup(cfg: TrainConfig) -> tuple[Any, Any, data_mod.Prepared]:
    """(the resolved job, its tokenizer, its data) for `cfg`, as the trainer sees them."""
    job = plan(cfg)
    tok = models.tokenizer(job.model_path)
    prepared = data_mod.prepare(job.cfg, tok, job.task, job.source, job.eval_source)
    return job, tok, prepared


def _probe(settings: BenchSettings, task: str, tok: Any) -> forgetting.Probe:
    return forgetting.build_probe(forgetting.kind_for(task), tok, settings.forgetting_data,
                                  settings.forgetting_examples)


def _primary(task: str, metrics: dict[str, float]) -> tuple[str, float | None]:
    name = "accuracy" if task == "classification" else "loss"
    return name, metrics.get(name)


def base_job(settings: BenchSettings) -> dict[str, Any]:
    """The untrained model: its task metric (a new task head as loaded, or the base LM) and its
    forgetting-measure value, the reference every run's forgetting is taken from."""
    t0 = time.perf_counter()
    cfg = settings.train_config(seed=0)
    job, tok, prepared = _setup(cfg)
    import torch

    from ..train.trainer import evaluate

    torch.manual_seed(0)  # a new task head, as seed 0's run starts from
    model = models.load(job.model_path, job.task, prepared.num_labels, tok.pad_token_id)
    metrics = evaluate(model, prepared.eval, job.task, num_labels=prepared.num_labels, pad_id=tok.pad_token_id,
                       batch_size=job.cfg.eval_batch_size)
    probe = _probe(settings, job.task, tok)
    name, value = _primary(job.task, metrics)
    return {"kind": "base", "task": job.task, "metric": name, "value": value, "metrics": metrics,
            "params": sum(p.numel() for p in model.parameters()),
            "forgetting": {"measure": probe.kind, "data": probe.data, "examples": probe.size,
                           "describe": probe.describe(), "base": forgetting.measure(model, probe, tok.pad_token_id)},
            "data": prepared.meta, "wall_seconds": round(time.perf_counter() - t0, 3)}


def _restart(folder: Path) -> dict[str, Any]:
    """How to start the trainer in `folder`: resume an unfinished checkpoint, replace anything else."""
    state = folder / "checkpoint" / STATE
    if state.is_file():
        try:
            doc = read(folder / "checkpoint")
        except CheckpointError:
            doc = {}
        if doc and not doc.get("finished"):
            return {"resume": str(folder)}
    return {"overwrite": True} if folder.exists() else {}


def trained_job(settings: BenchSettings, spec: RunSpec, seed: int, folder: Path, base: dict[str, Any],
                progress: bool) -> dict[str, Any]:
    """Train `spec` with `seed` through the trainer, then measure the saved adapter on a fresh base."""
    from ..core.loading import load

    t0 = time.perf_counter()
    trained = read_json(folder / TRAINED)
    if not (folder / "adapter").is_dir():
        trained = None
    restart = _restart(folder) if trained is None else {}
    options = dict(spec.options)
    cfg = settings.train_config(method=spec.method, method_options=options or None, seed=seed, out=str(folder),
                                eval_before=False, progress=progress, **spec.train, **restart)
    if trained is None:
        notes: list[str] = []
        result = train(cfg, echo=_quiet, warn=notes.append)
        trained = {"result": result, "peak_rss_bytes": memory.peak_rss_bytes(), "resumed": "resume" in restart,
                   "wall_seconds": round(time.perf_counter() - t0, 3), "notes": notes + result.get("notes", [])}
        # a bench stopped while this run is measured measures it again next time, without training it again
        write_json(folder / TRAINED, trained, default=str)
    result, peak_rss, wall = trained["result"], trained["peak_rss_bytes"], trained["wall_seconds"]
    t1 = time.perf_counter()
    job, tok, prepared = _setup(dataclasses.replace(cfg, resume=None, overwrite=False))
    model = models.load(job.model_path, job.task, prepared.num_labels, tok.pad_token_id)
    if job.cfg.base_dropout is not None:
        models.set_dropout(model, job.cfg.base_dropout)
    tuned = load(model, folder / "adapter", trainable=True)
    summary = tuned.summary()
    saved = memory.saved_for_backward_bytes(tuned, memory.probe_batch(prepared.train, job.cfg.batch_size,
                                                                      tok.pad_token_id), prepared.train.per_token)
    tuned.eval()
    probe = _probe(settings, job.task, tok)
    after = forgetting.measure(tuned, probe, tok.pad_token_id)
    name, value = _primary(job.task, result["metrics"])
    steps = max(1, result["steps"])
    return {
        "metric": name, "value": value, "metrics": result["metrics"],
        "params": {"trainable": summary.trainable, "trainable_without_head": summary.trainable - summary.head_trainable,
                   "head": summary.head_trainable, "model": base["params"],
                   "percent": 100.0 * summary.trainable / max(1, base["params"])},
        "adapter_bytes": result["adapter_bytes"],
        "memory": {"peak_rss_bytes": peak_rss, "saved_for_backward_bytes": saved},
        "time": {"steps": result["steps"], "train_seconds": result["train_seconds"],
                 "step_seconds": result["train_seconds"] / steps,
                 "wall_seconds": round(wall + time.perf_counter() - t1, 3)},
        "forgetting": _forgetting(base, after),
        "resumed": trained["resumed"], "lr": job.cfg.lr, "notes": trained["notes"],
        "measure_seconds": round(time.perf_counter() - t1, 3),
    }


def prompted_job(settings: BenchSettings, spec: RunSpec, seed: int, base: dict[str, Any],
                 progress: bool) -> dict[str, Any]:
    """Score the base causal LM prompted with `spec`'s examples in context; nothing is trained."""
    t0 = time.perf_counter()
    cfg = settings.train_config(seed=seed)
    job, tok, prepared = _setup(cfg)
    model = models.load(job.model_path, "lm", None, tok.pad_token_id)
    limit = models.position_limit(job.model_path)
    context = min(prompted.CONTEXT, limit) if limit else prompted.CONTEXT
    metrics = prompted.score(model, tok, job.cfg, job.task, job.source, job.eval_source, prepared,
                             int(spec.options.get("k", 0)), seed, max(context, job.cfg.max_length))
    name, value = _primary(job.task, metrics)
    return {
        "metric": name, "value": value, "metrics": metrics,
        "params": {"trainable": 0, "trainable_without_head": 0, "head": 0, "model": base["params"], "percent": 0.0},
        "adapter_bytes": 0,
        "memory": {"peak_rss_bytes": memory.peak_rss_bytes(), "saved_for_backward_bytes": 0},
        "time": {"steps": 0, "train_seconds": 0.0, "step_seconds": None,
                 "wall_seconds": round(time.perf_counter() - t0, 3)},
        "forgetting": _forgetting(base, base["forgetting"]["base"]),
        "notes": ["the base model, unchanged: nothing forgotten by construction"],
    }


def _forgetting(base: dict[str, Any], after: float) -> dict[str, Any]:
    f = base["forgetting"]
    return {"measure": f["measure"], "base": f["base"], "after": after, "lost": forgetting.lost(f["measure"], f["base"], after)}


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` (see `runner.job_for`) and write its record; returns the record."""
    settings = BenchSettings(**job["settings"])
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    if job["kind"] == "base":
        record = base_job(settings)
    else:
        spec = RunSpec(**job["spec"])
        base = read_json(Path(job["base"]))
        if base is None:
            raise BenchError(f"{job['base']} is missing: the base job runs first; run the bench again.")
        seed, progress = job["seed"], job["progress"]
        if spec.prompted:
            doc = prompted_job(settings, spec, seed, base, progress)
        else:
            doc = trained_job(settings, spec, seed, Path(job["run_dir"]), base, progress)
        record = {"label": spec.label, "method": spec.method, "family": spec.family, "seed": seed,
                  "spec": spec.to_dict(), **doc}
    record.update(peftkit=__version__, rss_scope="run" if job.get("isolated") else "bench process")
    save_record(Path(job["record"]), record)
    if job.get("run_dir"):  # done: the checkpoint (optimizer state, for a resume) is no longer needed
        shutil.rmtree(Path(job["run_dir"]) / "checkpoint", ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m peftkit.bench.worker JOB_JSON``: exit 0 with the record written, 130 when
    interrupted (the run's checkpoint is kept for the next attempt), 1 with a peftkit error as a JSON
    line on stdout."""
    from ..errors import PeftkitError
    from ..train.trainer import Interrupted

    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        execute(job)
    except (Interrupted, KeyboardInterrupt):
        return 130
    except PeftkitError as err:  # the bench reports it: the last stdout line
        print(json.dumps({"error": {"type": type(err).__name__, "message": str(err)}}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
