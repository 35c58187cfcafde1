"""What the commands share: their sub-parser, ``--json`` output, and an adapter loaded onto its base.

Where an adapter came from a ``peftkit train`` run, its ``run.json`` supplies the defaults (base
model, task, data, fields, label count), so ``--adapter runs/x/adapter`` is enough.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError, BaseMismatchError, ConfigError


def subcommand(subs: Any, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    """A sub-parser with a description, an example and ``--json``; flags left out stay unset."""
    p = subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=False, help="print one JSON object as the last stdout line")
    return p


def emit_json(doc: dict[str, Any]) -> None:
    sys.stdout.flush()
    print(json.dumps(doc, default=str), flush=True)


def emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    """`text` for people; with ``--json`` also `doc` as the last stdout line."""
    print(text, flush=True)
    if getattr(args, "json", False):
        emit_json(doc)


def add_adapter_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--adapter", required=required, help="adapter folder (a run's adapter/, best/ or checkpoint/)")
    p.add_argument("--model", help="base model: embedded name or folder [from the run's run.json]")
    p.add_argument("--check-base", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse an adapter whose recorded base does not match the model")


def adapter_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist.")
    return folder


def base_model_name(args: argparse.Namespace, run: dict[str, Any] | None) -> str:
    name = getattr(args, "model", None) or (run or {}).get("config", {}).get("model")
    if not name:
        raise ConfigError("which base model? pass --model (the adapter has no run.json next to it to say).")
    return name


def load_tuned(args: argparse.Namespace, task: str, num_labels: int | None = None) -> tuple[Any, Any, dict | None]:
    """(tokenizer, the adapter on a freshly loaded base in eval mode, the run's run.json or None)."""
    from ..core.loading import load
    from ..quant import quantize
    from ..train import models
    from ..train.run import load_run

    folder = adapter_folder(args.adapter)
    run = load_run(folder)
    path = models.resolve(base_model_name(args, run))
    tok = models.tokenizer(path)
    labels = num_labels or (run or {}).get("num_labels")
    model = models.load(path, task, labels, tok.pad_token_id)
    scheme = (run or {}).get("config", {}).get("quantize")
    if scheme:
        quantize(model, scheme)
    try:
        tuned = load(model, folder, check_base=args.check_base)
    except BaseMismatchError as err:
        raise err.with_skip("pass --no-check-base") from None
    tuned.eval()
    return tok, tuned, run
