"""The ``peftkit`` command line: train, eval, generate, merge, info, methods — one module each.

Every command has ``--help`` with an example; ``--json`` prints one JSON object as the last line
of stdout. A mistake in the input is one line on stderr and exit status 1 (2 for a bad flag);
Ctrl-C during training writes a resumable checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import PeftkitError
from . import evaluate, generate, info, merge, methods, train

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
COMMANDS = (train, evaluate, generate, merge, info, methods)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning. With no arguments, `peftkit train` fine-tunes MiniLM with "
                    "LoRA on Rotten Tomatoes.",
        epilog="examples:\n  peftkit train\n  peftkit train --model smollm2 --task instruction --data chatterbot\n"
               "  peftkit eval --adapter runs/minilm-rotten-tomatoes-lora/adapter\n  peftkit methods")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peftkit`` and ``python -m peftkit``; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenise in this process; no fork warnings
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    from ..train.trainer import Interrupted

    try:
        return args.run(args)
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
