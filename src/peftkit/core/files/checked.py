"""Strict readers shared by every file format: JSON objects and safetensors files, refused with an
`AdapterFileError` naming the file when they are missing, truncated, corrupted or malformed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import AdapterFileError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is not readable JSON ({err}); the adapter folder is damaged.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} does not hold a JSON object; the adapter folder is damaged.")
    return data


def read_tensors(path: Path, expected_sha256: str | None = None,
                 expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`, checked against its recorded size and SHA-256 first."""
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
