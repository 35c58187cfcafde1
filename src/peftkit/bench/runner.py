"""The bench from start to table: check everything, measure the base, run every (entry, seed) that
has no record yet, then aggregate.

`make_plan` checks every input before anything is written: the model, data and task (as `peftkit
train` does), every entry (a baseline must fit the task; a method must attach to the model, tried on
a copy of it), and the forgetting data. `run_bench` then refuses an ``--out`` holding another bench,
and runs each job in a fresh process (`worker`), so a killed bench loses at most the run in progress
(its checkpoint is resumed next time) and a run that fails is reported without stopping the others.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core import registry
from ..errors import ConfigError, PeftkitError
from ..train import models
from ..train.recipes import recipe
from . import aggregate, forgetting, plots, record
from .presets import PRESETS, Preset
from .progress import Progress
from .settings import BenchSettings
from .spec import RunSpec, parse_methods, unfit


@dataclasses.dataclass
class BenchPlan:
    """What a bench runs: its settings, its entries (each for `seeds` seeds; zero-shot once)."""

    settings: BenchSettings
    specs: list[RunSpec]
    seeds: int
    task: str
    preset: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def runs(self) -> list[tuple[RunSpec, int]]:
        return [(spec, seed) for spec in self.specs for seed in range(1 if spec.method == "zero-shot" else self.seeds)]


def make_plan(settings: BenchSettings, preset: str = "quick", methods: list[str] | None = None,
              seeds: int | None = None) -> BenchPlan:
    """Check the inputs and decide the runs; writes nothing. `methods` (``--methods`` values) replaces
    the preset's entries, `seeds` its seed count; the budget fields of `settings` left None
    (``max_steps``, ``max_eval_examples``, ``forgetting_examples``) come from the preset (its
    ``max_steps`` None: one epoch).

    Raises:
        ConfigError (and the trainer's input errors): anything that would stop a run.
    """
    from ..train import data as data_mod
    from ..train.run import plan

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}.")
    chosen: Preset = PRESETS[preset]
    settings = dataclasses.replace(settings, max_eval_examples=settings.max_eval_examples or chosen.max_eval_examples)
    job = plan(settings.train_config(method="lora"))
    kind = forgetting.kind_for(job.task)
    settings = dataclasses.replace(settings,
                                   forgetting_examples=settings.forgetting_examples or chosen.forgetting_examples[kind])
    tok = models.tokenizer(job.model_path)
    prepared = data_mod.prepare(job.cfg, tok, job.task, job.source, job.eval_source)
    steps = settings.max_steps or chosen.max_steps or math.ceil(len(prepared.train) / job.cfg.batch_size)
    settings = dataclasses.replace(settings, max_steps=steps)
    causal = models.is_causal(job.model_path)
    default_probe = settings.forgetting_data or forgetting.DEFAULT_DATA[kind]
    if default_probe == settings.data:
        raise ConfigError(f"forgetting is measured on data the task does not train on, and the task's data is "
                          f"{settings.data}; pass --forgetting-data with other "
                          f"{'prompt/response pairs' if kind == 'retrieval' else 'text'}.")
    try:  # readable, before anything runs
        forgetting.build_probe(kind, tok, settings.forgetting_data, 2)
    except PeftkitError as err:
        what = "prompt/response pairs (retrieval)" if kind == "retrieval" else "text (perplexity)"
        raise ConfigError(f"--forgetting-data {default_probe}: {err} Forgetting of task {job.task} is measured on "
                          f"{what}.") from None
    choices = [[s] for s in parse_methods(methods)] if methods else chosen.choices()
    model = models.load(job.model_path, job.task, prepared.num_labels, tok.pad_token_id)
    specs, notes = [], []
    for alternatives in choices:
        spec, reasons = None, []
        for candidate in alternatives:
            candidate = _with_schedule(candidate, steps)
            reason = unfit(candidate, job.task, causal, job.task == "classification", settings.model)
            reason = reason or (None if candidate.prompted else _attach_problem(model, candidate))
            if reason is None:
                spec = candidate
                break
            reasons.append(f"{candidate.label}: {reason}")
        if spec is not None:
            specs.append(spec)
        elif methods:
            raise ConfigError(f"--methods {reasons[0]}; drop it from --methods.")
        else:
            notes.append(f"preset {preset} leaves out {'; '.join(reasons)}")
    return BenchPlan(settings, specs, seeds or chosen.seeds, job.task, preset, notes)


def _with_schedule(spec: RunSpec, steps: int) -> RunSpec:
    """Methods scheduled over the run (AdaLoRA's budget) get the run's step count unless given one."""
    if spec.prompted or "total_steps" not in registry.get(spec.method).config_cls.option_names():
        return spec
    if "total_steps" in spec.options:
        return spec
    return dataclasses.replace(spec, options={**spec.options, "total_steps": steps})


def _attach_problem(model: Any, spec: RunSpec) -> str | None:
    """Why `spec` (with its recipe's options, as the trainer runs it) cannot attach to `model`."""
    from ..core.tuned import attach

    options = {**recipe(spec.method).options, **spec.options}
    try:
        attach(copy.deepcopy(model), registry.config(spec.method, **options))
    except PeftkitError as err:
        return str(err)
    return None


def environment(precision: str = "auto") -> dict[str, Any]:
    """Versions, machine and the arithmetic `precision` resolves to there, recorded with the results."""
    import torch
    import transformers

    from ..train.precision import resolve
    from ..version import __version__

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = precision
    if device.type == "cpu":  # resolving on a GPU would start CUDA in this process, which only waits for workers
        with contextlib.suppress(PeftkitError):
            resolved = resolve(precision, device)
    return {"peftkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device.type,
            "precision": resolved}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _job(plan: BenchPlan, out: Path, kind: str, spec: RunSpec | None = None, seed: int = 0,
         progress: bool = False, isolated: bool = True) -> dict[str, Any]:
    job: dict[str, Any] = {"kind": kind, "settings": plan.settings.to_dict(), "base": str(out / record.BASE_FILE),
                           "seed": seed, "progress": progress, "isolated": isolated}
    if spec is None:
        job["record"] = job["base"]
    else:
        job.update(spec=spec.to_dict(), record=str(record.record_path(out, spec, seed)))
        if not spec.prompted:
            job["run_dir"] = str(record.run_dir(out, spec, seed))
    return job


class RunFailed(PeftkitError):
    """One bench run stopped with an error; the bench goes on with the others."""


def _execute(job: dict[str, Any], isolated: bool) -> None:
    """Run `job` in a fresh process (or this one); a failure raises RunFailed with its message."""
    if not isolated:
        from .worker import execute

        try:
            execute(job)
        except PeftkitError as err:
            raise RunFailed(f"{type(err).__name__}: {err}") from None
        return
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "peftkit.bench.worker", json.dumps(job)],
                                stdout=subprocess.PIPE, text=True)
        stdout, _ = proc.communicate()
    except BaseException:
        if proc is not None:
            _stop(proc)
        raise
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode:
        last = (stdout or "").strip().splitlines()[-1:] or [""]
        try:
            err = json.loads(last[0])["error"]
            message = f"{err['type']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"the run's process exited with status {proc.returncode} (killed, or out of memory?)"
        raise RunFailed(message)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the worker of an interrupted bench. A terminal's Ctrl-C reaches the worker too, a signal sent to
    the bench alone does not: SIGTERM asks the worker's trainer to finish its step and checkpoint either way;
    a second interrupt while it does kills it."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def run_bench(plan: BenchPlan, out: str | Path, *, progress: bool = True, isolated: bool = True,
              echo: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `plan` into folder `out`: records, the aggregate table and CSV, and the plots.
    Returns what ``--json`` prints.

    Raises:
        BenchError: `out` holds another bench or other files.
        KeyboardInterrupt: interrupted; finished runs are kept and a run in progress is resumed next time.
    """
    out = Path(out)
    identity = plan.settings.identity()
    continued = record.check_folder(out, identity)
    for note in plan.notes:
        (warn or echo)(note)
    env = environment(plan.settings.precision)
    record.write_settings(out, identity, {"preset": plan.preset, "entries": [s.to_dict() for s in plan.specs],
                                          "seeds": plan.seeds, "environment": env})
    with _terminate_as_interrupt():
        return _run(plan, out, continued, env, progress=progress, isolated=isolated, echo=echo, warn=warn)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`) stops the bench the way Ctrl-C does: the run in progress checkpoints, records are kept."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(plan: BenchPlan, out: Path, continued: bool, env: dict[str, Any], *, progress: bool, isolated: bool,
         echo: Callable[[str], None], warn: Callable[[str], None] | None) -> dict[str, Any]:
    runs = plan.runs()
    bar = Progress(len(runs) + 1, show=progress)
    failures: list[str] = []
    base = record.read_json(out / record.BASE_FILE)
    if base is None:
        t0 = time.perf_counter()
        if progress:
            echo_err("peftkit bench: measuring the untrained model (task metric and forgetting reference)")
        _execute(_job(plan, out, "base", isolated=isolated), isolated)
        base = record.read_json(out / record.BASE_FILE)
        bar.finish(RunSpec("base", "zero-shot"), time.perf_counter() - t0)
    else:
        bar.skip(RunSpec("base", "zero-shot"), None)
    for i, (spec, seed) in enumerate(runs):
        path = record.record_path(out, spec, seed)
        done = record.load_record(path, spec)
        if done is not None:
            bar.skip(spec, (done.get("time") or {}).get("wall_seconds"))
            continue
        bar.start(spec, seed, [s for s, _ in runs[i:]])
        t0 = time.perf_counter()
        try:
            _execute(_job(plan, out, "run", spec, seed, progress, isolated), isolated)
        except RunFailed as err:
            failures.append(f"{spec.label} seed {seed}: {err}")
            (warn or echo)(f"{spec.label} seed {seed} failed: {err}")
        bar.finish(spec, time.perf_counter() - t0)
    records = [r for r in (record.load_record(record.record_path(out, s, seed)) for s, seed in runs) if r]
    rows = aggregate.rows(records, base, [s.label for s in plan.specs])
    files = aggregate.write(out, rows, base, plan, env)
    if plots.available():
        files.update(plots.write(out / "plots", rows, base))
    else:
        (warn or echo)("matplotlib is not installed, so no plots were drawn; pip install matplotlib, then run the "
                       "same command again (finished runs are kept) to draw them.")
    return {"out": str(out), "continued": continued, "task": plan.task, "settings": plan.settings.to_dict(),
            "entries": [s.label for s in plan.specs], "seeds": plan.seeds, "base": base, "rows": rows,
            "records": len(records), "runs": len(runs), "failed": failures, "files": files, "environment": env,
            "table": aggregate.markdown(rows, base)}


def echo_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
