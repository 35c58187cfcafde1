"""``peftkit train``: the main job. Its flags are `TrainConfig`'s fields, one per field, made here
from the fields' types and help (`peftkit.train.config`), so a new setting is a new field and
nothing else. Precedence: defaults < the resumed run's settings (``--resume FOLDER``, or bare
``--resume`` with a run in ``--out``) < ``--config FILE`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from .common import emit_json, subcommand, warn

EXAMPLE = "peftkit train --method lora --method-options r=16,targets=[query,value] --epochs 2 --out runs/rt"


def config_flag(p: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """The flag of TrainConfig field `field` (``--batch-size``), with its help, type and choices."""
    kind, meta = str(field.type), field.metadata
    help_ = meta["help"]
    options: dict[str, Any] = {"dest": field.name}
    if kind.startswith("bool"):
        options["action"] = argparse.BooleanOptionalAction
        if field.default is not None:
            help_ += f" [{'on' if field.default else 'off'}]"
    else:
        if "const" in meta:
            options.update(nargs="?", const=meta["const"])
        elif kind.startswith(("int", "float")):
            options["type"] = int if kind.startswith("int") else float
        if field.default is not None and "[" not in help_:
            help_ += f" [{field.default}]"
    for key in ("choices", "metavar"):
        if key in meta:
            options[key] = meta[key]
    p.add_argument("--" + field.name.replace("_", "-"), help=help_, **options)


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "train", "fine-tune a model with a PEFT method", EXAMPLE)
    p.add_argument("--config", help="YAML file of settings (the keys below, with underscores); flags override it")
    p.add_argument("--print-config", action="store_true", default=False,
                   help="print the settings as the run would use them (defaults resolved) as YAML, and exit")
    for field in dataclasses.fields(TrainConfig):
        config_flag(p, field)
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: defaults < a resumed run's recorded ones < --config FILE < flags."""
    from ..train import config as tc
    from ..train.run import default_out, resumed_settings

    flags = {k: v for k, v in vars(args).items() if k in tc.FIELDS}

    def layered(base: TrainConfig) -> TrainConfig:
        cfg = tc.load_file(args.config, base) if getattr(args, "config", None) else base
        return tc.from_mapping(flags, "command line", cfg)

    cfg = layered(TrainConfig())
    if cfg.resume is None:
        return cfg
    if cfg.resume in ("auto", ""):  # bare --resume: the run in --out (or the default folder) says
        out = cfg.out or str(default_out(cfg.validate().resolved()))
        found = resumed_settings(str(Path(out) / "checkpoint"))
        recorded = found[1] if found else {}
    else:
        found = resumed_settings(cfg.resume)
        recorded = found[1] if found else {}
    return layered(tc.from_mapping(recorded, "the resumed run's settings")) if recorded else cfg


def run(args: argparse.Namespace) -> int:
    from ..train.run import plan, train

    cfg = _config(args)
    if args.print_config:
        import yaml

        job = plan(cfg)  # every value as the run would use it: the task's and the method's defaults resolved
        shown = dataclasses.replace(job.cfg, out=str(job.out)).to_dict()
        print(yaml.safe_dump(shown, sort_keys=False).rstrip())
        if args.json:
            emit_json({"config": shown})
        return 0
    result = train(cfg, echo=(lambda s: print(s, flush=True)), warn=warn)
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        emit_json(result)
    return 0
