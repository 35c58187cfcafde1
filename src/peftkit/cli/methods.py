"""``peftkit methods``: the registered methods, their family and their training recipe."""

from __future__ import annotations

import argparse
from typing import Any

from .common import emit, subcommand


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "methods", "list the registered PEFT methods", "peftkit methods --json")
    p.set_defaults(run=run)


def _line(row: dict[str, Any], width: int) -> str:
    return (f"{row['name']:<{width}}  {row['family']:<16} {row['summary']}"
            + (f" Default lr {row['recommended_lr']:g}." if row["recommended_lr"] else "")
            + (f" Task head lr {row['recommended_head_lr']:g}." if row["recommended_head_lr"] else "")
            + (f" Base dropout {row['recommended_base_dropout']:g}." if row["recommended_base_dropout"] is not None
               else "")
            + (" Fits a new task head first." if row["probe_head"] else "")
            + "".join(f" Trains with {k}={v}." for k, v in row["train_options"].items()))


def run(args: argparse.Namespace) -> int:
    from ..core import registry
    from ..train.recipes import recipe

    rows = []
    for spec in registry.specs():
        rec = recipe(spec.name)
        rows.append({"name": spec.name, "family": spec.family, "summary": spec.summary, "hf_peft": spec.hf is not None,
                     "recommended_lr": rec.lr, "recommended_head_lr": rec.head_lr,
                     "recommended_base_dropout": rec.base_dropout, "probe_head": rec.probe_head,
                     "train_options": dict(rec.options), "options": list(spec.config_cls.option_names())})
    width = max((len(r["name"]) for r in rows), default=4)
    emit(args, {"methods": rows}, "\n".join(_line(r, width) for r in rows))
    return 0
