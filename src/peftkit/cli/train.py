"""``peftkit train``: the main job. Its flags are `TrainConfig`'s fields, one per field, made here
from the fields' types and help (`peftkit.train.config`), so a new setting is a new field and
nothing else. Precedence: defaults < ``--config FILE`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..train.config import TrainConfig
from .common import emit_json, subcommand

EXAMPLE = "peftkit train --method lora --method-options r=16,targets=[query,value] --epochs 2 --out runs/rt"


def _flag(p: argparse.ArgumentParser, field: dataclasses.Field) -> None:
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
                   help="print the effective settings as YAML and exit")
    for field in dataclasses.fields(TrainConfig):
        _flag(p, field)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import config as tc
    from ..train.run import train

    cfg = tc.load_file(args.config) if getattr(args, "config", None) else TrainConfig()
    cfg = tc.from_mapping({k: v for k, v in vars(args).items() if k in tc.FIELDS}, "command line", cfg)
    if args.print_config:
        import yaml

        shown = cfg.validate().resolved()  # the method is shown resolved; task-dependent values as given
        shown = dataclasses.replace(cfg, method=shown.method, method_options=shown.method_options)
        print(yaml.safe_dump(shown.to_dict(), sort_keys=False).rstrip())
        return 0
    result = train(cfg, echo=(lambda s: print(s, flush=True)))
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        emit_json(result)
    return 0
