"""The ``peftkit`` command line: train, eval, generate, merge, info, methods.

Every command has ``--help`` with an example; ``--json`` prints one JSON object as the last line
of stdout. A mistake in the input is one line on stderr and exit status 1 (2 for a bad flag);
Ctrl-C during training writes a resumable checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import PeftkitError

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _sub(subs: Any, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=False, help="print one JSON object as the last stdout line")
    return p


def _train_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", help="YAML file of settings (keys as below, with underscores); flags override it")
    a("--print-config", action="store_true", default=False, help="print the effective config as YAML and exit")
    a("--model", help="embedded name (minilm, smollm2) or a local Hugging Face model folder [minilm]")
    a("--task", choices=["classification", "instruction", "lm"], help="default: from the data and model")
    a("--data", help="embedded name (rotten-tomatoes, chatterbot, hamlet) or a CSV/JSONL/JSON/Parquet/text file")
    a("--eval-data", help="held-out file (default: a fixed hash split of --data)")
    a("--eval-fraction", type=float, help="held-out share when the data has no split of its own [0.1]")
    for role in ("text", "label", "prompt", "response"):
        a(f"--{role}-field", help=f"column holding the {role}")
    a("--method", help="a registered method (see `peftkit methods`) [lora]")
    a("--method-options", help="k=v,... over the method's recommended training options (`peftkit methods`; LoRA: "
                               "every linear layer), e.g. r=16,alpha=32,targets=[query,value] (YAML values)")
    a("--quantize", choices=["nf4", "fp4", "int8"], help="quantize the frozen base (QLoRA-style)")
    a("--lr", type=float, help="peak learning rate [the method's recommended rate (`peftkit methods`), else 2e-3 "
                           "for instruction, 1e-3 otherwise]")
    a("--head-lr", type=float, help="peak learning rate of a new task head (classification) [--lr]")
    a("--base-dropout", type=float, help="dropout probability inside the frozen base model (0: off) "
                                         "[the method's recommended one (`peftkit methods`), else the model's own]")
    a("--probe-head", action=argparse.BooleanOptionalAction, default=None,
      help="fit a new classification head by logistic regression on the untrained model's features before "
           "training [the method's choice (`peftkit methods`): soft prompts do]")
    a("--weight-decay", type=float)
    a("--schedule", choices=["cosine", "linear", "constant"], help="after warmup [linear]")
    a("--warmup", type=float, help="warmup: fraction of steps (<1) or a step count [0.06]")
    a("--max-grad-norm", type=float, help="gradient clipping (0: off) [1.0]")
    a("--batch-size", type=int, help="examples per process per micro-batch [32 classification, 8 otherwise]")
    a("--grad-accum", type=int, help="micro-batches per optimizer step [1]")
    a("--max-length", type=int, help="tokens per example [128 classification, 256 otherwise]")
    a("--epochs", type=float, help="passes over the training data [1]")
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--eval-every", type=int, help="evaluate (and keep the best adapter) every N steps")
    a("--eval-batch-size", type=int, help="examples per evaluation batch [128 classification, 16 otherwise]")
    a("--save-every", type=int, help="checkpoint every N steps [eval-every, or 200]")
    a("--early-stopping", type=int, help="stop after N evaluations without improvement")
    a("--metric", help="metric for the best adapter [accuracy / loss]")
    a("--load-best", action="store_true", help="finish with the best evaluated adapter")
    a("--seed", type=int)
    a("--out", help="run folder [runs/<model>-<data>-<method>]")
    a("--resume", nargs="?", const="auto", help="continue from <out>/checkpoint, or from the folder given")
    a("--no-eval-before", dest="eval_before", action="store_false", help="skip the evaluation before training")
    a("--gradient-checkpointing", action="store_true")
    a("--no-group-by-length", dest="group_by_length", action="store_false",
      help="random batches (default: each batch from a length-sorted pool of 4, less padding)")
    a("--threads", type=int, help="torch CPU threads")
    a("--tensorboard", action="store_true", help="also log to <out>/tensorboard")
    a("--no-progress", dest="progress", action="store_false")
    a("--num-labels", type=int)
    a("--calibration-batches", type=int, help="training batches for data-scored methods (SNIP/GraSP masks) [4]")


def _common_model_args(p: argparse.ArgumentParser, adapter_required: bool = True) -> None:
    p.add_argument("--adapter", required=adapter_required, help="adapter folder (a run's adapter/, best/ or checkpoint/)")
    p.add_argument("--model", help="base model: embedded name or folder [from the run's run.json]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning. With no arguments, `peftkit train` fine-tunes MiniLM with "
                    "LoRA on Rotten Tomatoes.",
        epilog="examples:\n  peftkit train\n  peftkit train --model smollm2 --task instruction --data chatterbot\n"
               "  peftkit eval --adapter runs/minilm-rotten-tomatoes-lora/adapter\n  peftkit methods")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_args(_sub(subs, "train", "fine-tune a model with a PEFT method",
                     "peftkit train --method lora --method-options r=16,targets=[query,value] --epochs 2 --out runs/rt"))
    p = _sub(subs, "eval", "evaluate an adapter on held-out data",
             "peftkit eval --adapter runs/minilm-rotten-tomatoes-lora/adapter")
    _common_model_args(p)
    for flag in ("--data", "--eval-data", "--task", "--text-field", "--label-field", "--prompt-field",
                 "--response-field"):
        p.add_argument(flag)
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", type=int, dest="eval_batch_size")
    p = _sub(subs, "generate", "generate text with a causal LM and an adapter",
             "peftkit generate --model smollm2 --adapter runs/smollm2-chatterbot-lora/adapter --prompt 'Hello'")
    _common_model_args(p, adapter_required=False)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read lines from stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=True)
    p = _sub(subs, "merge", "fold an adapter into its base and write a Hugging Face model folder",
             "peftkit merge --adapter runs/minilm-rotten-tomatoes-lora/adapter --out merged/")
    _common_model_args(p)
    p.add_argument("--out", required=True, help="folder for the merged model (created; must not hold other files)")
    p = _sub(subs, "info", "describe an adapter folder", "peftkit info runs/minilm-rotten-tomatoes-lora/adapter")
    p.add_argument("path", help="adapter folder")
    _sub(subs, "methods", "list the registered PEFT methods", "peftkit methods --json")
    return parser


def _emit_json(doc: dict[str, Any]) -> None:
    sys.stdout.flush()
    print(json.dumps(doc, default=str), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import config as tc
    from .train.run import train

    cfg = tc.load_file(args.config) if getattr(args, "config", None) else tc.TrainConfig()
    flags = {k: v for k, v in vars(args).items() if k in tc.FIELDS}
    if isinstance(flags.get("method_options"), str):
        flags["method_options"] = tc.parse_options(flags["method_options"])
    cfg = tc.from_mapping(flags, "command line", cfg)
    if args.print_config:
        import yaml

        shown = cfg.validate().resolved()  # the method is shown resolved; task-dependent values as given
        shown = dataclasses.replace(cfg, method=shown.method, method_options=shown.method_options)
        print(yaml.safe_dump(shown.to_dict(), sort_keys=False).rstrip())
        return 0
    result = train(cfg, echo=(lambda s: print(s, flush=True)))
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        _emit_json(result)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"train": cmd_train}


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .train import commands

        return getattr(commands, f"cmd_{name}")(args)

    return run


for _name in ("eval", "generate", "merge", "info", "methods"):
    COMMANDS[_name] = _lazy(_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peftkit`` and ``python -m peftkit``; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenise in this process; no fork warnings
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .train.trainer import Interrupted

    try:
        return COMMANDS[args.command](args)
    except Interrupted as stop:
        print(f"peftkit: {stop}. Continue with the same command plus --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("peftkit: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PeftkitError as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `peftkit ... | head`
        sys.stderr.close()
        return 0
