"""User-facing errors. Every failure a user can cause is a `PeftkitError` whose message says what
was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftkitError(Exception):
    """Base of every error peftkit raises for bad input or misuse."""


class ConfigError(PeftkitError, ValueError):
    """A method configuration or option is invalid."""


class TargetError(PeftkitError, LookupError):
    """A target spec matched no module, or matched a module the method cannot adapt."""


class AdapterStateError(PeftkitError, RuntimeError):
    """An operation does not fit the current adapter state (unknown name, already merged, ...)."""


class NotMergeableError(PeftkitError, RuntimeError):
    """The adapter's form cannot be folded into the base weights."""


class AdapterFileError(PeftkitError, OSError):
    """An adapter file or folder is missing, corrupt, or does not fit the model."""

    remedy = "save the adapter again or restore it from a backup"  # what to do about a damaged file


class CheckpointError(PeftkitError, OSError):
    """A training checkpoint is missing, damaged or from an incompatible run."""

    remedy = "resume from another checkpoint or start the run again"


class BaseMismatchError(AdapterFileError):
    """An adapter's recorded base does not match the model it is loaded onto. The message ends with
    how to skip the check where the user is: ``check_base=False`` in Python (`skip`), a flag on the
    command line."""

    def __init__(self, problem: str, skip: str = "pass check_base=False") -> None:
        super().__init__(problem, skip)
        self.problem, self.skip = problem, skip

    def __str__(self) -> str:
        return f"{self.problem}, or {self.skip} to load it anyway."

    def with_skip(self, skip: str) -> BaseMismatchError:
        return BaseMismatchError(self.problem, skip)


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base re-quantized it: outputs moved by the quantization error."""


def shown(value: object, limit: int = 80) -> str:
    """`value`'s repr for a message, cut to `limit` characters; never raises."""
    try:
        text = repr(value)
    except Exception:  # an int past Python's 4300-digit limit, or a user object whose repr fails
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to `word` (difflib ratio), best first."""
    pool = list(dict.fromkeys(candidates))
    return difflib.get_close_matches(word, pool, n=n, cutoff=0.4)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    near = closest(word, candidates)
    return f" Did you mean: {', '.join(near)}?" if near else ""
