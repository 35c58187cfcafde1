"""peftkit's own adapter format: ``adapter.safetensors`` + ``adapter.json``.

``adapter.json`` holds the method config, the format version, a fingerprint of the base (see
`fingerprint.py`) and the SHA-256 and size of the tensor file, so a truncated or corrupted file is
refused before anything is loaded.
"""

from __future__ import annotations

import re
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
from .checked import TENSOR_NAME, ErrorClass, finite, read_json, read_tensors, sha256_file

NAME = "peftkit"
VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "adapter.json"
DTYPES = frozenset({"F32", "F16", "BF16", "F64", "BOOL", "U8"})  # what adapters hold: weights (model dtype) and masks
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+\Z")  # as `TunedModel.attach` accepts
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
        "base": base_fingerprint(tuned, name),
        "files": {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
    })


def base_fingerprint(tuned: Any, name: str) -> dict[str, Any]:
    """The fingerprint of adapter `name`'s base, or the one `tuned` pinned (a sharded model's base,
    fingerprinted before it was sharded: see `train/fsdp.py`)."""
    pinned = getattr(tuned, "pinned_fingerprint", None)
    if pinned is not None:
        return pinned(name)
    return fingerprint(tuned.model, tuned.sites(name), whole_sites(tuned.deltas(name)))


def whole_sites(deltas: Iterable[tuple[str, Any]]) -> set[str]:
    """Sites whose parameters an adapter stores whole, from its ``(site.slot, delta)`` pairs."""
    return {prefix.rpartition(".")[0] for prefix, delta in deltas if delta.holds_values}


def _copied_sites(state: Tensors) -> set[str]:
    """Sites stored whole, read from tensor names (``<site>.<slot>.values.<param>``): for files written
    before the fingerprint recorded them."""
    return {key.split(".values.")[0].rpartition(".")[0] for key in state
            if ".values." in key and not key.startswith("__model__.")}


def _number_pairs(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, int | float) for x in value)


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is malformed in an ``adapter.json`` (None: nothing), checked before any of it is used."""
    name, base, files = meta.get("name"), meta.get("base") or {}, meta.get("files") or {}
    if name is not None and not (isinstance(name, str) and ADAPTER_NAME.match(name)):
        return f"adapter name {str(name)[:80]!r} (letters, digits, '_' and '-' only)"
    if not isinstance(meta.get("method"), str) or not isinstance(meta.get("config"), dict):
        return "'method' is not a name or 'config' is not a mapping"
    if not isinstance(base, dict) or not isinstance(files, dict):
        return "'base' or 'files' is not a mapping"
    shapes, sketch = base.get("shapes") or {}, base.get("sketch") or {}
    if not (isinstance(shapes, dict) and all(TENSOR_NAME.match(site) and isinstance(s, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(type(d) is int for d in v) for k, v in s.items())
            for site, s in shapes.items())):
        return "the base's 'shapes' are not a mapping of site names to tensor shapes"
    if not (isinstance(sketch, dict) and all(isinstance(s, dict) and all(_number_pairs(v) for v in s.values())
                                             for s in sketch.values())):
        return "the base's 'sketch' is not a mapping of sites to (mean, rms) pairs"
    if not all(isinstance(x, str) for x in base.get("whole") or []) or not isinstance(base.get("geometry") or {}, dict):
        return "the base's 'whole' or 'geometry' is malformed"
    info = files.get(WEIGHTS, {})
    if not (isinstance(info, dict) and isinstance(info.get("sha256", ""), str)
            and type(info.get("bytes", 0)) is int):
        return f"the record of {WEIGHTS} is not a SHA-256 and a byte count"
    return None


def read_meta(folder: Path) -> dict[str, Any]:
    """``adapter.json``, checked to be a well-formed peftkit description this version reads."""
    meta = read_json(folder / META)
    if meta.get("format") != NAME:
        raise AdapterFileError(f"{folder / META} is not a peftkit adapter description: {AdapterFileError.remedy}.")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        raise AdapterFileError(f"{folder / META} has no valid format_version ({version!r}); the adapter folder is "
                               f"damaged: {AdapterFileError.remedy}.")
    if version > VERSION:
        raise AdapterFileError(f"{folder / META} uses adapter format version {version!r}; this peftkit reads up to "
                               f"{VERSION}. Upgrade peftkit to load it.")
    problem = _meta_problem(meta)
    if problem:
        raise AdapterFileError(f"{folder / META} is malformed: {problem}. The adapter folder is damaged: "
                               f"{AdapterFileError.remedy}.")
    return meta


def read_state(folder: Path, meta: dict[str, Any] | None = None, error: ErrorClass = AdapterFileError) -> Tensors:
    """The adapter's tensors, checked against the size and SHA-256 its description records, and
    refused (with `error`) when they hold NaN or infinity."""
    meta = read_meta(folder) if meta is None else meta
    info = meta.get("files", {}).get(WEIGHTS, {})
    state = read_tensors(folder / WEIGHTS, info.get("sha256"), info.get("bytes"), dtypes=DTYPES, error=error)
    finite(state, folder / WEIGHTS, error)
    return state


def read(model: nn.Module, folder: Path, check_base: bool) -> tuple[Any, Tensors, str | None]:
    """(config, tensors, saved adapter name) of the adapter in `folder`, for `model` (a plain model).

    Raises:
        AdapterFileError: a damaged or newer file, or (with `check_base`) a base it does not fit.
    """
    meta = read_meta(folder)
    try:
        config = make_config(meta["config"])
    except (PeftkitError, KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{folder / META} holds an invalid method config: {err} ({AdapterFileError.remedy}, "
                               "or upgrade peftkit if a newer one wrote it)") from None
    state = read_state(folder, meta)
    base = meta.get("base") or {}
    errors, notes = compare(base, model, whole=_copied_sites(state)) if check_base else ([], [])
    if errors:
        raise BaseMismatchError(f"adapter {folder} does not fit this model: {'; '.join(errors)}. Load it onto the "
                                f"base it was trained on ({base.get('name_or_path') or base.get('architecture')})")
    for note in notes:
        warnings.warn(f"{folder}: {note}", stacklevel=3)
    return config, state, meta.get("name")
