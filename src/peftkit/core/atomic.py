"""Every file peftkit writes goes through here: written under a temporary name, flushed to disk,
then renamed into place, so a crash or a kill leaves either the old content or the new, never a mix.

- `atomic_file(path)` — yields a temporary path next to `path`; on success it replaces `path`.
- `write_text(path, text)` / `write_json(path, doc)` — the common cases of `atomic_file`.
- `atomic_folder(path)` — yields a temporary folder; on success it replaces the folder `path`. On
  Linux the two folders are swapped in one step (``renameat2(RENAME_EXCHANGE)``), so `path` always
  holds a complete folder; elsewhere the old one is first moved aside under ``.<name>.old-*``, and
  a kill between that and the next rename leaves `path` missing for a moment: readers call
  `existing(path)`, which finds the complete old copy then.

Either way the previous copy is deleted only after the new one is in place. Temporary names carry
the writer's process id (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>-*``); a successful write
deletes the leftovers of writers that are no longer running (killed mid-write).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftover_pid(name: str, target: str) -> int | None:
    """The writer's process id in a temporary name of `target` (None: not one)."""
    for kind in ("tmp", "old"):
        prefix = f".{target}.{kind}-"
        if name.startswith(prefix):
            pid = name[len(prefix):].partition("-")[0]
            return int(pid) if pid.isdigit() else None
    return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    """Delete temporary files and folders of `target` left by writers that were killed."""
    with os.scandir(target.parent) as entries:
        stale = [e.path for e in entries if (pid := _leftover_pid(e.name, target.name)) is not None
                 and not _running(pid)]
    for path in stale:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def existing(path: str | os.PathLike) -> Path:
    """`path`, or where a write that was killed left its complete previous copy: the newest
    ``.<name>.old-*`` sibling when `path` itself is missing (see the module docstring). Returns
    `path` unchanged when neither exists."""
    target = Path(path)
    if os.path.lexists(target) or not target.parent.is_dir():
        return target
    prefix = f".{target.name}.old-"
    olds = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    return max(olds, key=lambda p: p.lstat().st_mtime_ns) if olds else target


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path in `path`'s folder; when the block ends without an error, the
    file written there replaces `path`. The folder is created when missing."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, target)
        fsync(target.parent)
        _clean_leftovers(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, doc: Any, **dump: Any) -> None:
    write_text(path, json.dumps(doc, **{"indent": 2, **dump}) + "\n")


@functools.cache
def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete folder `tmp` at `target`; the previous folder, if any, ends up at `tmp`
    (exchange) or is deleted (fallback)."""
    if not target.exists():
        os.replace(tmp, target)
    elif not _exchange(tmp, target):
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)  # put the previous copy back
            raise
        fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder next to `path`; when the block ends without an error, it
    replaces the folder `path` (see the module docstring). The parent folder is created when missing."""
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync(file)
        fsync(tmp)
        _swap_in(tmp, target)
        fsync(target.parent)
        _clean_leftovers(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
