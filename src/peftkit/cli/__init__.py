"""The ``peftkit`` command line: train, eval, generate, merge, info, methods, bench — one module each.

Every command has ``--help`` with an example; ``--json`` prints one JSON object as the last line
of stdout. Every failure is one line on stderr (and, under ``--json``, ``{"error": {"type": ...,
"message": ...}}`` as the last stdout line), never a traceback: exit status 1 for a mistake in the
input, 2 for a bad flag (with the closest flag suggested). Ctrl-C during training writes a resumable
checkpoint and exits with status 130. ``PEFTKIT_DEBUG=1`` lets an unexpected exception through.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import PeftkitError
from ..version import __version__
from . import bench, evaluate, generate, info, merge, methods, train
from .common import PeftkitParser, UsageError, emit_json, one_line, unknown_argument

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
COMMANDS = (train, evaluate, generate, merge, info, methods, bench)


def build_parser() -> PeftkitParser:
    parser = PeftkitParser(
        prog="peftkit", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Parameter-efficient fine-tuning. With no arguments, `peftkit train` fine-tunes MiniLM with "
                    "LoRA on Rotten Tomatoes.",
        epilog="examples:\n  peftkit train\n  peftkit train --model smollm2 --task instruction --data chatterbot\n"
               "  peftkit eval --adapter runs/minilm-rotten-tomatoes-lora/adapter\n  peftkit methods")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}",
                        help="print peftkit's version and exit")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=PeftkitParser)
    for command in COMMANDS:
        command.add_parser(subs)
    parser.commands = dict(subs.choices)
    return parser


def _fail(kind: str, message: str, as_json: bool, status: int, label: str = "error: ") -> int:
    """One line on stderr; under ``--json`` also the error as the last stdout line."""
    message = one_line(message)
    print(f"peftkit: {label}{message}", file=sys.stderr, flush=True)
    if as_json:
        emit_json({"error": {"type": kind, "message": message}})
    return status


def _parse(parser: PeftkitParser, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        raise UsageError(command.prog, unknown_argument(command, extra))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peftkit`` and ``python -m peftkit``; returns the exit status (a bad flag
    raises ``SystemExit(2)``, as ``--help`` raises ``SystemExit(0)``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenise in this process; no fork warnings
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except UsageError as err:
        raise SystemExit(_fail("UsageError", str(err), as_json, EXIT_USAGE)) from None
    if args.command is None:
        parser.print_help()
        return 0
    from ..train.trainer import Interrupted

    try:
        return args.run(args)
    except Interrupted as stop:
        return _fail("Interrupted", f"{stop}. Continue with the same command plus --resume.", as_json,
                     EXIT_INTERRUPTED, label="")
    except KeyboardInterrupt:
        return _fail("Interrupted", "interrupted.", as_json, EXIT_INTERRUPTED, label="")
    except PeftkitError as err:
        return _fail(type(err).__name__, str(err), as_json, EXIT_ERROR)
    except BrokenPipeError:  # `peftkit ... | head`
        sys.stderr.close()
        return 0
    except OSError as err:  # the system refused something the checks up front could not foresee
        where = f" ({err.filename})" if err.filename else ""
        return _fail(type(err).__name__, f"{err.strerror or err}{where}; check the path and its permissions, "
                     "or the free disk space.", as_json, EXIT_ERROR)
    except Exception as err:
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        return _fail(type(err).__name__, f"{type(err).__name__}: {err} — a peftkit bug: please report it with the "
                     "command (PEFTKIT_DEBUG=1 shows the traceback).", as_json, EXIT_ERROR)
