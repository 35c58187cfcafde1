"""Adapter files: ``adapter.safetensors`` + ``adapter.json``, written atomically, read strictly.

``adapter.json`` holds the method config, the peftkit format version, a fingerprint of the base
(see `fingerprint.py`) and the SHA-256 and size of the tensor file, so a truncated or corrupted
file is refused before anything is loaded. Several adapters go into one sub-folder each with an
``adapters.json`` index. The Hugging Face PEFT layout is handled by `hf_peft.py`.

A failed load leaves the model exactly as it was (modules, weights and ``requires_grad`` flags).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AdapterFileError, PeftkitError
from .fingerprint import compare, fingerprint
from .registry import config_from_dict
from .tuned import TunedModel

FORMAT = "peftkit"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
META = "adapter.json"
INDEX = "adapters.json"
HF_CONFIG = "adapter_config.json"
_OURS = {WEIGHTS, META, INDEX, HF_CONFIG, "adapter_model.safetensors", "README.md"}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` in one rename (old copy removed
    only after the new one is in place). A crash leaves `path` as it was."""
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a folder; choose another output path.")
    if target.exists():
        foreign = [p.name for p in target.iterdir() if p.name not in _OURS and not (p / META).exists()
                   and not (p / HF_CONFIG).exists()]
        if foreign:
            raise AdapterFileError(f"refusing to overwrite {target}: it holds files that are not adapter files "
                                   f"({', '.join(sorted(foreign)[:3])}); choose an empty or new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_adapter(tuned: TunedModel, name: str, folder: Path) -> None:
    """Write one adapter's two files into `folder` (which must exist)."""
    from .. import __version__

    weights = folder / WEIGHTS
    save_file(_cpu_contiguous(tuned.adapter_state(name)), str(weights), metadata={"format": "pt", "writer": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": tuned.config_of(name).method,
        "config": tuned.config_of(name).to_dict(),
        "base": fingerprint(tuned.model, tuned.sites(name)),
        "files": {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
    }
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def save(tuned: TunedModel, path: str | os.PathLike, *, format: str = FORMAT, adapter: str | None = None) -> str:
    """Save adapter `adapter` (default: every adapter) to folder `path`; returns the path."""
    names = [adapter] if adapter is not None else tuned.adapters
    for name in names:
        tuned.config_of(name)
    if not names:
        raise AdapterFileError("this model has no adapters to save.")
    if format == "hf-peft":
        from .hf_peft import write_hf_adapter

        writer = write_hf_adapter
    elif format == FORMAT:
        writer = write_adapter
    else:
        raise AdapterFileError(f"unknown format {format!r}; use 'peftkit' or 'hf-peft'.")
    with atomic_dir(path) as tmp:
        if len(names) == 1:
            writer(tuned, names[0], tmp)
        else:
            for name in names:
                (tmp / name).mkdir()
                writer(tuned, name, tmp / name)
            (tmp / INDEX).write_text(json.dumps({"format": format, "adapters": names}, indent=2) + "\n")
    return str(Path(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is not readable JSON ({err}); the adapter folder is damaged.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} does not hold a JSON object; the adapter folder is damaged.")
    return data


def read_tensors(path: Path, expected_sha256: str | None = None, expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; the adapter folder is incomplete.")
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        raise AdapterFileError(f"{path} has {path.stat().st_size} bytes but {expected_bytes} were written: "
                               "the file is truncated or was replaced. Save the adapter again.")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterFileError(f"{path} does not match its recorded SHA-256: the file is corrupted. "
                               "Save the adapter again or restore it from a backup.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a valid safetensors file ({err}).") from None


def _snapshot(module: nn.Module) -> dict[int, bool]:
    return {id(p): p.requires_grad for p in module.parameters()}


def _restore(module: nn.Module, flags: dict[int, bool]) -> None:
    for p in module.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])


def install(model: nn.Module, config: Any, state: dict[str, torch.Tensor], name: str, trainable: bool) -> TunedModel:
    """Attach `config` as `name` and load `state`; on any error undo everything and re-raise."""
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    flags = _snapshot(tuned)
    active, weights = tuned.context.active, dict(tuned.context.weights)
    try:
        tuned.attach(config, name, trainable=trainable)
        tuned.load_adapter_state(name, state)
    except BaseException:
        if name in tuned.adapters:
            tuned.delete(name)
        _restore(tuned, flags)
        tuned.context.active, tuned.context.weights = active, weights
        raise
    return tuned


def _load_peftkit(model: nn.Module, folder: Path, name: str | None, trainable: bool, check_base: bool) -> TunedModel:
    meta = _read_json(folder / META)
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{folder / META} is not a peftkit adapter description.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(f"{folder} uses adapter format version {version!r}; this peftkit reads up to "
                               f"{FORMAT_VERSION}. Upgrade peftkit to load it.")
    try:
        config = config_from_dict(meta["config"])
    except (PeftkitError, KeyError, TypeError) as err:
        raise AdapterFileError(f"{folder / META} holds an invalid method config: {err}") from None
    info = meta.get("files", {}).get(WEIGHTS, {})
    state = read_tensors(folder / WEIGHTS, info.get("sha256"), info.get("bytes"))
    raw = model.model if isinstance(model, TunedModel) else model
    base = meta.get("base") or {}
    errors, notes = compare(base, raw) if check_base else ([], [])
    if errors:
        raise AdapterFileError(f"adapter {folder} does not fit this model: {'; '.join(errors)}. Load it onto the "
                               f"base it was trained on ({base.get('name_or_path') or base.get('architecture')}), "
                               "or pass check_base=False to skip the check.")
    for note in notes:
        warnings.warn(f"{folder}: {note}", stacklevel=3)
    return install(model, config, state, name or meta.get("name") or "default", trainable)


def load(model: nn.Module, path: str | os.PathLike, *, name: str | None = None, adapter: str | None = None,
         trainable: bool = False, check_base: bool = True) -> TunedModel:
    """Load adapter(s) from `path` onto `model`; the format (peftkit or Hugging Face PEFT) is detected.

    Args:
        name: the adapter's name on the model (default: the saved name, or "default").
        adapter: in a multi-adapter folder, load only this one (default: all).
        trainable: leave the loaded adapter trainable (default frozen, for inference).
        check_base: refuse an adapter whose base fingerprint does not match the model.

    Raises:
        AdapterFileError: missing, truncated or corrupted files, an unknown format version, or an
            adapter that does not fit the model. The model is left untouched.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist.")
    if (folder / META).is_file():
        return _load_peftkit(model, folder, name, trainable, check_base)
    if (folder / HF_CONFIG).is_file():
        from .hf_peft import load_hf_adapter

        return load_hf_adapter(model, folder, name or "default", trainable)
    if (folder / INDEX).is_file():
        names = _read_json(folder / INDEX).get("adapters", [])
        chosen = [adapter] if adapter is not None else names
        missing = [n for n in chosen if n not in names]
        if missing:
            raise AdapterFileError(f"{folder} holds adapters {names}, not {missing}.")
        tuned = model
        for n in chosen:
            tuned = load(tuned, folder / n, name=n if name is None or len(chosen) > 1 else name,
                         trainable=trainable, check_base=check_base)
        return tuned
    raise AdapterFileError(f"{folder} holds no adapter: expected {META} (peftkit), {HF_CONFIG} (Hugging Face PEFT) "
                           f"or {INDEX} (several adapters).")
