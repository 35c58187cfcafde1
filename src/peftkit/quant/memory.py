"""Giving freed memory back to the operating system, and reading what the process holds.

glibc keeps freed heap memory for reuse, and raises its mmap threshold after large frees, so
after quantizing layer by layer the freed full-precision buffers can stay in the resident set.
`release()` asks glibc to return them (``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return libc


def release(collect: bool = False) -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); `collect` runs the GC first."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (Linux ``VmRSS``), or None where unavailable."""
    return _status("VmRSS")


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (Linux ``VmHWM``), or None."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Restart the peak (``VmHWM``) from the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
