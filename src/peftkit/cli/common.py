"""What the commands share: their parser (one-line usage errors), ``--json`` output, flag value
types, and an adapter loaded onto its base.

Where an adapter came from a ``peftkit train`` run, its ``run.json`` supplies the defaults (base
model, task, data, fields, label count), so ``--adapter runs/x/adapter`` is enough.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..errors import AdapterFileError, BaseMismatchError, ConfigError, closest


class UsageError(Exception):
    """A flag the parser refuses (unknown, missing, or of the wrong type or value)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: {message} (see `{prog} --help`)")


class PeftkitParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised as `UsageError` (`cli.main` prints it)."""

    commands: dict[str, argparse.ArgumentParser]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a prefix must not start meaning another flag when one is added
        super().__init__(*args, **kwargs)
        self.commands = {}

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '?([^' ]+)'? \(choose from (.*)\)", message)
        if choice:
            names = [n.strip(" '") for n in choice.group(2).split(",")]
            near = closest(choice.group(1), names, n=1)
            message += f"; did you mean {near[0]}?" if near else ""
        raise UsageError(self.prog, message)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def unknown_argument(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """'unrecognized argument --lrr; did you mean --lr?' for the first argument `parser` does not know."""
    flag = next((a for a in extra if a.startswith("-")), extra[0])
    name = flag.split("=", 1)[0]
    if not name.startswith("-"):
        return f"unexpected argument {flag!r}"
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    near = closest(name, flags, n=1)
    return f"unrecognized argument {name}" + (f"; did you mean {near[0]}?" if near else "")


def subcommand(subs: Any, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    """A sub-parser with a description, an example and ``--json``; flags left out stay unset."""
    p = subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=False,
                   help="print one JSON object as the last stdout line (an error too: {\"error\": {...}})")
    return p


def number(kind: type, least: float, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) at least `least` (above it when not `inclusive`)."""
    what = {int: "an integer", float: "a number"}[kind]
    bound = f">= {least:g}" if inclusive else f"> {least:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}") from None
        if value < least or (value == least and not inclusive) or value != value:  # NaN compares unequal
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, 1)


def emit_json(doc: dict[str, Any]) -> None:
    sys.stdout.flush()
    print(json.dumps(doc, default=str), flush=True)


def emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    """`text` for people; with ``--json`` also `doc` as the last stdout line."""
    print(text, flush=True)
    if getattr(args, "json", False):
        emit_json(doc)


def warn(message: str) -> None:
    print(f"peftkit: warning: {message}", file=sys.stderr, flush=True)


def add_adapter_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--adapter", required=required, help="adapter folder (a run's adapter/, best/ or checkpoint/)")
    p.add_argument("--model", help="base model: embedded name or folder [from the run's run.json]")
    p.add_argument("--check-base", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse an adapter whose recorded base does not match the model; --no-check-base loads "
                        "it anyway [on]")


def adapter_folder(path: str, what: str = "--adapter") -> Path:
    """The adapter folder `path` names, or an error that says what `path` is and what to pass instead."""
    from ..core.files import INDEX, detect

    folder = Path(path)
    if folder.is_file():
        parent = f" (its folder: {folder.parent})" if folder.suffix in (".json", ".safetensors", ".bin") else ""
        raise AdapterFileError(f"{folder} is a file; {what} takes an adapter folder{parent}, e.g. runs/<run>/adapter.")
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist.")
    if detect(folder) is None and not (folder / INDEX).is_file():
        final, best = folder / "adapter", folder / "best"
        if detect(final) or detect(best) or (folder / "checkpoint").is_dir() or (folder / "run.json").is_file():
            best_hint = (f" or its best evaluated one, {best}" if detect(best) else
                         " (runs with --eval-every also keep the best evaluated one in best/)")
            raise AdapterFileError(f"{folder} is a training run's folder, not an adapter; pass its final adapter, "
                                   f"{final}{best_hint}.")
    return folder


def base_model_name(args: argparse.Namespace, run: dict[str, Any] | None) -> str:
    name = getattr(args, "model", None) or (run or {}).get("config", {}).get("model")
    if not name:
        raise ConfigError("which base model? pass --model (the adapter has no run.json next to it to say).")
    return name


def adapter_task(folder: Path, run: dict[str, Any] | None) -> tuple[str | None, str]:
    """(the task an adapter was trained for, if its files say, its base model as the files name it)."""
    from ..core.files import detect, hf_format, peftkit_format
    from ..core.files.checked import read_json

    found = detect(folder)
    task = (run or {}).get("data", {}).get("task")
    model = str((run or {}).get("config", {}).get("model") or "")
    if found is not None and found.name == peftkit_format.NAME:
        base = read_json(folder / peftkit_format.META).get("base") or {}
        arch = str(base.get("architecture") or "")
        task = task or ("classification" if "Classification" in arch else None)
        model = model or str(base.get("name_or_path") or arch)
        model = f"{model} ({arch})" if arch and arch not in model else model
    elif found is not None and found.name == hf_format.NAME:
        conf = read_json(folder / hf_format.HF_CONFIG)
        kind = conf.get("task_type")
        task = task or {"SEQ_CLS": "classification", "CAUSAL_LM": "lm"}.get(str(kind))
        model = model or str(conf.get("base_model_name_or_path") or "")
    return task, model or "an unknown model"


def load_tuned(args: argparse.Namespace, task: str, num_labels: int | None = None) -> tuple[Any, Any, dict | None]:
    """(tokenizer, the adapter on a freshly loaded base in eval mode, the run's run.json or None)."""
    from ..core.loading import load
    from ..quant import quantize
    from ..train import models
    from ..train.run import load_run

    folder = adapter_folder(args.adapter)
    run = load_run(folder)
    path = models.resolve(base_model_name(args, run))
    if task != "classification" and not models.is_causal(path):
        raise ConfigError(f"{args.adapter} is for a causal LM, and {path} is an encoder; pass the base it was "
                          "trained on with --model.")
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
