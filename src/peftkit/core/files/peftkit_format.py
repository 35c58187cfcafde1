"""peftkit's own adapter format: ``adapter.safetensors`` + ``adapter.json``.

``adapter.json`` holds the method config, the format version, a fingerprint of the base (see
`fingerprint.py`) and the SHA-256 and size of the tensor file, so a truncated or corrupted file is
refused before anything is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...errors import AdapterFileError, BaseMismatchError, PeftkitError
from ...version import __version__
from ..atomic import atomic_file, write_json
from ..fingerprint import compare, fingerprint
from ..registry import config as make_config
from .checked import read_json, read_tensors, sha256_file

NAME = "peftkit"
VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "adapter.json"
Tensors = dict[str, torch.Tensor]


def write(tuned: Any, name: str, folder: Path) -> None:
    """Write adapter `name` of `tuned` (a TunedModel) as this format's two files into `folder`."""
    weights = folder / WEIGHTS
    state = {k: v.detach().to("cpu").contiguous() for k, v in tuned.adapter_state(name).items()}
    with atomic_file(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "writer": NAME})
    config = tuned.config_of(name)
    write_json(folder / META, {
        "format": NAME,
        "format_version": VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "base": fingerprint(tuned.model, tuned.sites(name), whole_sites(tuned.deltas(name))),
        "files": {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
    })


def whole_sites(deltas: Iterable[tuple[str, Any]]) -> set[str]:
    """Sites whose parameters an adapter stores whole, from its ``(site.slot, delta)`` pairs."""
    return {prefix.rpartition(".")[0] for prefix, delta in deltas if delta.holds_values}


def _copied_sites(state: Tensors) -> set[str]:
    """Sites stored whole, read from tensor names (``<site>.<slot>.values.<param>``): for files written
    before the fingerprint recorded them."""
    return {key.split(".values.")[0].rpartition(".")[0] for key in state
            if ".values." in key and not key.startswith("__model__.")}


def read_meta(folder: Path) -> dict[str, Any]:
    """``adapter.json``, checked to be a peftkit description this version reads."""
    meta = read_json(folder / META)
    if meta.get("format") != NAME:
        raise AdapterFileError(f"{folder / META} is not a peftkit adapter description.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > VERSION:
        raise AdapterFileError(f"{folder} uses adapter format version {version!r}; this peftkit reads up to "
                               f"{VERSION}. Upgrade peftkit to load it.")
    return meta


def read_state(folder: Path, meta: dict[str, Any] | None = None) -> Tensors:
    """The adapter's tensors, checked against the size and SHA-256 its description records."""
    meta = read_meta(folder) if meta is None else meta
    info = meta.get("files", {}).get(WEIGHTS, {})
    return read_tensors(folder / WEIGHTS, info.get("sha256"), info.get("bytes"))


def read(model: nn.Module, folder: Path, check_base: bool) -> tuple[Any, Tensors, str | None]:
    """(config, tensors, saved adapter name) of the adapter in `folder`, for `model` (a plain model).

    Raises:
        AdapterFileError: a damaged or newer file, or (with `check_base`) a base it does not fit.
    """
    meta = read_meta(folder)
    try:
        config = make_config(meta["config"])
    except (PeftkitError, KeyError, TypeError) as err:
        raise AdapterFileError(f"{folder / META} holds an invalid method config: {err}") from None
    state = read_state(folder, meta)
    base = meta.get("base") or {}
    errors, notes = compare(base, model, whole=_copied_sites(state)) if check_base else ([], [])
    if errors:
        raise BaseMismatchError(f"adapter {folder} does not fit this model: {'; '.join(errors)}. Load it onto the "
                                f"base it was trained on ({base.get('name_or_path') or base.get('architecture')})")
    for note in notes:
        warnings.warn(f"{folder}: {note}", stacklevel=3)
    return config, state, meta.get("name")
