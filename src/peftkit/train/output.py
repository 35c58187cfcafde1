"""Output folders checked before any work: a folder (not a file) that this process can write in."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import PeftkitError


class OutputError(PeftkitError, OSError):
    """An output path is a file, or lies where nothing can be written."""


def check_writable(path: Path, flag: str = "--out") -> None:
    """Refuse `path` unless it is (or can become) a folder this process can write in.

    The nearest existing folder is tried with a temporary file that is removed at once: permission
    bits do not tell a read-only file system, nor what root may do.

    Raises:
        OutputError: `path` or a folder above it is a file, or the place cannot be written.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a folder (it is created if missing).")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {path} lies under {probe}, which is a file; give a folder elsewhere.")
    try:
        handle, name = tempfile.mkstemp(prefix=".peftkit-write-check-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        raise OutputError(f"cannot write in {probe} ({err.strerror or err}); choose another {flag} "
                          "or make the folder writable.") from None
