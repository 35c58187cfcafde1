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


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base re-quantized it: outputs moved by the quantization error."""


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to `word` (difflib ratio), best first."""
    pool = list(dict.fromkeys(candidates))
    return difflib.get_close_matches(word, pool, n=n, cutoff=0.4)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    near = closest(word, candidates)
    return f" Did you mean: {', '.join(near)}?" if near else ""
