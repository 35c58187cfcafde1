"""``peftkit bench``: the assessment (`peftkit.bench`). Which method, at what cost, and what is lost, on
the model and data of ``peftkit train``'s flags: several seeds per method, full fine-tuning and the
no-training baselines beside them, forgetting measured, a table, a CSV and plots under ``--out``.
Stopped and started again with the same arguments, it skips the runs already recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from .common import POSITIVE_INT, emit_json, subcommand, warn
from .train import config_flag

EXAMPLE = ("peftkit bench --preset quick\n  peftkit bench --model smollm2 --task instruction --data chatterbot\n"
           "  peftkit bench --methods lora:r=16 sparse_adapter:sparsity=0.8 full head-only --seeds 3 --max-steps 300")
SHARED = ("model", "data", "eval_data", "eval_fraction", "task", "text_field", "label_field", "prompt_field",
          "response_field", "max_length", "batch_size", "precision", "threads")


def add_parser(subs: Any) -> None:
    from ..bench.presets import PRESETS

    p = subcommand(subs, "bench", "compare PEFT methods with full fine-tuning and baselines on your model and data: "
                                  "quality, size, memory, time and forgetting, over seeds", EXAMPLE)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: one method per family + full + head-only (+ zero-/few-shot for a causal LM), 2 seeds, "
                        "120 steps each; all: every registered method and baseline, 3 seeds, one epoch each [quick]")
    p.add_argument("--methods", nargs="+", metavar="ENTRY",
                   help="entries instead of the preset's: registered methods with options (lora, lora:r=16,alpha=32, "
                        "sparse_adapter:sparsity=0.8; lr= and head_lr= set the run's rates) and the baselines full, "
                        "head-only, zero-shot, few-shot[:k=N]; separate arguments or comma-separated")
    p.add_argument("--seeds", type=POSITIVE_INT, metavar="N", help="seeds per entry [the preset's: quick 2, all 3]")
    p.add_argument("--max-steps", type=POSITIVE_INT, metavar="N",
                   help="each training run's optimizer steps [the preset's: quick 120, all one epoch]")
    p.add_argument("--max-eval-examples", type=POSITIVE_INT, metavar="N",
                   help="score every run on a fixed sample of N held-out examples [the preset's: quick 1000, all every one]")
    p.add_argument("--forgetting-data", metavar="DATA",
                   help="what forgetting is measured on: prompt/response pairs for a classifier's retrieval, text for a "
                        "language model's perplexity [chatterbot; hamlet]")
    p.add_argument("--forgetting-examples", type=POSITIVE_INT, metavar="N",
                   help="pairs (retrieval) or 128-token blocks (perplexity) forgetting is measured on [the preset's: "
                        "quick 500 pairs / 64 blocks, all 1000 / 256]")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in SHARED:
        config_flag(p, fields[name])
    p.add_argument("--out", help="the bench's folder [runs/bench-<model>-<data>-<preset>]; an existing bench with the "
                                 "same settings is continued, one with other settings refused")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show the running method and seed with an ETA, and the training bar, on stderr [on]")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each (method, seed) in a fresh process, so its peak memory is its own and a crash stops "
                        "only that run; --no-isolate runs them all in this process (quicker to start) [on]")
    p.set_defaults(run=run)


def _default_out(settings: Any, preset: str, custom: bool) -> Path:
    def slug(s: str) -> str:
        return Path(s).stem if ("/" in s or "." in s) else s

    return Path("runs") / f"bench-{slug(settings.model)}-{slug(settings.data)}-{'custom' if custom else preset}"


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchSettings, make_plan, run_bench
    from ..train import config as tc

    given = {k: v for k, v in vars(args).items() if k in SHARED}
    tc.from_mapping(given, "command line").validate()  # the shared flags' own checks, as train makes them
    settings = BenchSettings(**given, max_steps=getattr(args, "max_steps", None),
                             max_eval_examples=getattr(args, "max_eval_examples", None),
                             forgetting_data=getattr(args, "forgetting_data", None),
                             forgetting_examples=getattr(args, "forgetting_examples", None))
    methods = getattr(args, "methods", None)
    plan = make_plan(settings, args.preset, methods, getattr(args, "seeds", None))
    out = Path(args.out) if getattr(args, "out", None) else _default_out(settings, args.preset, bool(methods))
    try:
        doc = run_bench(plan, out, progress=args.progress, isolated=args.isolate, echo=lambda s: print(s, flush=True), warn=warn)
    except KeyboardInterrupt:
        message = f"interrupted; finished runs are kept in {out}: run the same command again to continue."
        print(f"peftkit: {message}", file=sys.stderr, flush=True)
        if args.json:
            emit_json({"error": {"type": "Interrupted", "message": message}})
        return 130
    files = doc["files"]
    print(doc["table"], flush=True)
    print(f"\nrecords: {out / 'records'}; table: {files['table']}; csv: {files['csv']}; plots: "
          f"{', '.join(v for k, v in files.items() if k not in ('table', 'csv'))}", flush=True)
    if args.json:
        emit_json({k: v for k, v in doc.items() if k != "table"})
    if doc["failed"]:
        print(f"peftkit: error: {len(doc['failed'])} run(s) failed, the table holds the others: "
              + "; ".join(doc["failed"]), file=sys.stderr, flush=True)
        return 1
    return 0
