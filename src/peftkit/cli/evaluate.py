"""``peftkit eval``: an adapter's held-out metrics, on its run's data or other data."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .common import POSITIVE_INT, adapter_folder, add_adapter_args, emit, load_tuned, subcommand, warn

_DATA_FLAGS = ("data", "eval_data", "task", "text_field", "label_field", "prompt_field", "response_field",
               "max_length", "eval_batch_size", "max_eval_examples")


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "eval", "evaluate an adapter on held-out data",
                   "peftkit eval --adapter runs/minilm-rotten-tomatoes-lora/adapter")
    add_adapter_args(p)
    p.add_argument("--data", help="data to evaluate on [the run's]; its own held-out split is used")
    p.add_argument("--eval-data", help="a held-out file to evaluate on")
    p.add_argument("--task", choices=["classification", "instruction", "lm"], help="[the run's]")
    for role in ("text", "label", "prompt", "response"):
        p.add_argument(f"--{role}-field", help=f"column holding the {role} [the run's]")
    p.add_argument("--max-length", type=POSITIVE_INT, help="tokens per example [the run's]")
    p.add_argument("--batch-size", type=POSITIVE_INT, dest="eval_batch_size", help="examples per evaluation batch")
    p.add_argument("--max-eval-examples", type=POSITIVE_INT, metavar="N",
                   help="evaluate on at most N held-out examples: the same seeded sample as training's [the run's]")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar on stderr [on]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import data as data_mod
    from ..train.config import TrainConfig
    from ..train.files import DataError
    from ..train.run import load_run, plan
    from ..train.trainer import evaluate

    saved_run = load_run(adapter_folder(args.adapter))
    saved = dict((saved_run or {}).get("config", {}))
    saved.update({k: getattr(args, k) for k in _DATA_FLAGS if getattr(args, k, None) is not None})
    if getattr(args, "model", None):
        saved["model"] = args.model
    if "data" in vars(args) and "eval_data" not in vars(args):
        saved["eval_data"] = None  # new data: use its own held-out split
    base = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    base.update(resume=None, out=None, quantize=None, overwrite=False)
    job = plan(TrainConfig(**base))
    tok, tuned, _ = load_tuned(args, job.task, (saved_run or {}).get("num_labels"))
    prepared = data_mod.prepare(job.cfg, tok, job.task, job.source, job.eval_source)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise DataError(f"{job.cfg.data} leaves no held-out examples to evaluate on; pass --eval-data FILE, or "
                        "--data with more rows.")
    for note in prepared.notes:
        warn(note)
    if prepared.num_labels is not None and saved_run and saved_run.get("num_labels"):
        prepared.num_labels = max(prepared.num_labels, saved_run["num_labels"])
    metrics = evaluate(tuned, prepared.eval, job.task, num_labels=prepared.num_labels, pad_id=tok.pad_token_id,
                       batch_size=job.cfg.eval_batch_size, progress=args.progress)
    text = f"{args.adapter} on {job.cfg.data} ({prepared.meta['eval_examples']} held-out): " + ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
    emit(args, {"metrics": metrics, "adapter_path": args.adapter, "data": prepared.meta}, text)
    return 0
