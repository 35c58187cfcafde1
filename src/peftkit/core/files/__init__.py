"""Adapter files: the formats peftkit reads and writes, as a table over the tuned model.

A format is a folder layout with a marker file that identifies it, a writer of one adapter
(``write(tuned, name, folder)``) and a reader (``read(model, folder, check_base) -> (config,
tensors, saved name)``). Several adapters go into one sub-folder each, with an ``adapters.json``
index. Saving is atomic (`core.atomic`); loading is `core.loading.load`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import AdapterFileError
from ..atomic import atomic_folder, write_json
from . import hf_format, peftkit_format
from .checked import read_json

INDEX = "adapters.json"


@dataclass(frozen=True)
class FileFormat:
    name: str
    marker: str  # the file that identifies a folder of this format
    files: tuple[str, ...]  # every file the writer puts in a folder
    write: Callable[[Any, str, Path], None]
    read: Callable[[nn.Module, Path, bool], tuple[Any, dict[str, torch.Tensor], str | None]]


FORMATS: dict[str, FileFormat] = {f.name: f for f in (
    FileFormat(peftkit_format.NAME, peftkit_format.META, (peftkit_format.WEIGHTS, peftkit_format.META),
               peftkit_format.write, peftkit_format.read),
    FileFormat(hf_format.NAME, hf_format.HF_CONFIG, (hf_format.HF_WEIGHTS, hf_format.HF_CONFIG),
               hf_format.write, hf_format.read),
)}
_OURS = {INDEX, "README.md", hf_format.HF_WEIGHTS_BIN, *(n for f in FORMATS.values() for n in f.files)}


def detect(folder: Path) -> FileFormat | None:
    """The format of the adapter in `folder` (None: not a single adapter; see `INDEX`)."""
    return next((f for f in FORMATS.values() if os.path.lexists(folder / f.marker)), None)


def read_index(folder: Path) -> list[str]:
    """The adapter names in `folder`'s ``adapters.json``, each checked to be a plain name whose
    sub-folder is really in `folder` (not a link out of it, not a path) and holds one adapter."""
    path = folder / INDEX
    names = read_json(path).get("adapters")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise AdapterFileError(f"{path} has no list of adapter names; the folder is damaged: {AdapterFileError.remedy}.")
    bad = next((n for n in names if not peftkit_format.ADAPTER_NAME.match(n)), None)
    if bad is not None:
        raise AdapterFileError(f"{path} names adapter {bad[:80]!r}: names are letters, digits, '_' and '-', not "
                               f"paths, so the folder is damaged or was not written by peftkit: {AdapterFileError.remedy}.")
    if len(set(names)) != len(names):
        raise AdapterFileError(f"{path} names an adapter twice; the folder is damaged: {AdapterFileError.remedy}.")
    real = folder.resolve()
    for name in names:
        sub = folder / name
        if not sub.is_dir() or sub.resolve() != real / name:
            raise AdapterFileError(f"{sub} is {'a link' if sub.is_symlink() else 'not a folder'}; each adapter of "
                                   f"{path} must be a folder inside {folder}: {AdapterFileError.remedy}.")
        if detect(sub) is None:
            raise AdapterFileError(f"{sub} holds no single adapter; the folder is damaged: {AdapterFileError.remedy}.")
    return names


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a file, or a folder holding anything but adapter files."""
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a folder; choose another output path.")
    if target.exists():
        foreign = [p.name for p in target.iterdir() if p.name not in _OURS and not (p.is_dir() and detect(p))]
        if foreign:
            raise AdapterFileError(f"refusing to overwrite {target}: it holds files that are not adapter files "
                                   f"({', '.join(sorted(foreign)[:3])}); choose an empty or new folder.")


def save(tuned: Any, path: str | os.PathLike, *, format: str = peftkit_format.NAME, adapter: str | None = None) -> str:
    """Save adapter `adapter` (default: every adapter) of `tuned` to folder `path`; returns the path."""
    names = [adapter] if adapter is not None else tuned.adapters
    for name in names:
        tuned.config_of(name)
    if not names:
        raise AdapterFileError("this model has no adapters to save.")
    if format not in FORMATS:
        raise AdapterFileError(f"unknown format {format!r}; use {' or '.join(map(repr, FORMATS))}.")
    writer = FORMATS[format].write
    target = Path(path).resolve()
    _check_replaceable(target)
    with atomic_folder(target) as tmp:
        if len(names) == 1:
            writer(tuned, names[0], tmp)
        else:
            for name in names:
                (tmp / name).mkdir()
                writer(tuned, name, tmp / name)
            write_json(tmp / INDEX, {"format": format, "adapters": names})
    return str(Path(path))
