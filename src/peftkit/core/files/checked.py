"""Strict readers shared by every file format (adapters and training checkpoints).

A file is read only when it is a regular file inside its folder (a symlink may point elsewhere in
the folder, or into the ``blobs/`` of a Hugging Face cache snapshot, never anywhere else), and only
up to a size bound. JSON is bounded in bytes and nesting. A safetensors header is parsed and checked
against the file's real size here, before safetensors sees the file: a header declaring tensors the
file cannot hold, overlapping or duplicate entries, unknown dtypes or odd names is refused, so what
is allocated is bounded by the file's size. Every refusal is an `AdapterFileError` (or the `error`
class the caller passes) naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import AdapterFileError, CheckpointError

MAX_JSON_BYTES = 4 << 20  # adapter configs are a few KiB; trainer states with long histories well under this
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 16 << 20  # safetensors itself allows 100 MB; ours hold a few thousand entries at most
# safetensors dtype names and their item sizes in bytes
DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
          "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOATING = frozenset({"F16", "BF16", "F32", "F64"})
# tensor names: dot-separated words of letters, digits, '_' and '-' (no '/', no empty or '..' parts)
TENSOR_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z")
ErrorClass = type[AdapterFileError] | type[CheckpointError]  # both say what to do (`remedy`)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _roots(folder: Path) -> list[Path]:
    """Where files of `folder` may really live: the folder, and for a Hugging Face cache snapshot
    (``<repo>/snapshots/<revision>``, whose files link to ``<repo>/blobs/``) the repository's blobs."""
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    return roots


def inside(path: Path, error: ErrorClass = AdapterFileError) -> Path:
    """`path` resolved, checked to be a regular file whose real location is in its own folder (see
    the module docstring); raises `error` otherwise."""
    folder = path.parent.resolve()
    if not os.path.lexists(path):
        raise error(f"{path} is missing; the folder is incomplete: {error.remedy}.")
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in _roots(folder)):
        raise error(f"{path} is a link to {real}, outside its folder; peftkit does not follow links out of an "
                    "adapter or checkpoint folder. Copy the file into the folder instead.")
    try:
        mode = real.stat().st_mode
    except OSError as err:
        raise error(f"{path} cannot be read ({err.strerror}); check the file.") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file: {error.remedy}.")
    return real


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {repeated!r} appears twice")
    return dict(pairs)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (a deep document cannot overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json(text: bytes, where: str, error: ErrorClass = AdapterFileError) -> dict[str, Any]:
    """The JSON object in `text` (from `where`): duplicate keys, nesting over `MAX_JSON_DEPTH` and
    anything but an object are refused."""
    try:
        data = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise error(f"{where} is not readable JSON ({reason}); the file is damaged: {error.remedy}.") from None
    if not isinstance(data, dict):
        raise error(f"{where} does not hold a JSON object; the file is damaged: {error.remedy}.")
    if _depth(data) > MAX_JSON_DEPTH:
        raise error(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep, so peftkit did not write it: "
                    f"{error.remedy}.")
    return data


def read_json(path: Path, error: ErrorClass = AdapterFileError, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `path`, read only when it is a regular file in its folder of at most `limit` bytes."""
    real = inside(path, error)
    with open(real, "rb") as f:
        text = f.read(limit + 1)
    if len(text) > limit:
        raise error(f"{path} is over {limit >> 20} MiB, far larger than the JSON files peftkit writes: "
                    f"{error.remedy}.")
    return parse_json(text, str(path), error)


def _counts(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


def _header(f: BinaryIO, size: int, path: Path, error: ErrorClass) -> dict[str, tuple[str, list[int]]]:
    """The tensor entries (name -> (dtype, shape)) of the safetensors file open as `f`, `size` bytes
    long, after checking that they describe exactly the bytes the file holds."""
    damaged, fix = f"{path} is not a valid safetensors file", error.remedy
    if size < 8:
        raise error(f"{damaged}: {size} bytes, too short for a header. The file is truncated: {fix}.")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise error(f"{damaged}: its header claims {n:,} bytes but the file has {size:,}. The file is truncated "
                    f"or corrupted: {fix}.")
    if n > MAX_HEADER_BYTES:
        raise error(f"{damaged}: a {n:,}-byte header is larger than any adapter needs: {fix}.")
    doc = parse_json(f.read(n), f"the header of {path}", error)
    data_bytes = size - 8 - n
    entries, spans = {}, []
    for name, info in doc.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise error(f"{damaged}: its __metadata__ is not a mapping of strings: {fix}.")
            continue
        if not TENSOR_NAME.match(name):
            raise error(f"{damaged}: tensor name {name[:80]!r} is not a dotted name (letters, digits, '_', '-'), "
                        f"so the file is corrupted or was not written for a model: {fix}.")
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if dtype not in DTYPES or not _counts(shape) or not _counts(offsets) or len(offsets) != 2:
            raise error(f"{damaged}: the entry of tensor {name!r} is malformed ({json.dumps(info)[:120]}). "
                        f"The file is corrupted: {fix}.")
        begin, end = offsets
        if not begin <= end <= data_bytes or math.prod(shape) * DTYPES[dtype] != end - begin:
            raise error(f"{damaged}: tensor {name!r} ({dtype} {shape}) does not fit bytes {begin}..{end} of the "
                        f"{data_bytes:,} the file holds. The file is truncated or corrupted: {fix}.")
        entries[name] = (dtype, shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise error(f"{damaged}: its tensors overlap or leave gaps in the data. The file is corrupted: {fix}.")
        position = end
    if position != data_bytes:
        raise error(f"{damaged}: {data_bytes - position:,} bytes after the last tensor. The file is corrupted: "
                    f"{fix}.")
    return entries


def header(path: Path, error: ErrorClass = AdapterFileError) -> dict[str, tuple[str, list[int]]]:
    """The checked tensor entries (name -> (safetensors dtype, shape)) of safetensors file `path`."""
    real = inside(path, error)
    with open(real, "rb") as f:
        return _header(f, os.fstat(f.fileno()).st_size, path, error)


def metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file already checked by `header`."""
    with open(path.resolve(), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__") or {}


def read_tensors(path: Path, expected_sha256: str | None = None, expected_bytes: int | None = None, *,
                 error: ErrorClass = AdapterFileError, dtypes: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path`, after checking (in this order) that it is a regular
    file in its folder, its recorded size, its header against its real size, the dtypes (`dtypes`:
    the allowed safetensors dtype names, None for any) and its recorded SHA-256."""
    real = inside(path, error)
    size = real.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise error(f"{path} has {size} bytes but {expected_bytes} were written: the file is truncated or was "
                    f"replaced: {error.remedy}.")
    entries = header(path, error)
    odd = {name: dtype for name, (dtype, _) in entries.items() if dtypes is not None and dtype not in dtypes}
    if odd:
        name, dtype = next(iter(odd.items()))
        raise error(f"{path} stores tensor {name!r} as {dtype}, where {'/'.join(sorted(dtypes or ()))} is expected: "
                    f"so it does not hold adapter weights: {error.remedy}.")
    if expected_sha256 is not None and sha256_file(real) != expected_sha256:
        raise error(f"{path} does not match its recorded SHA-256: the file is corrupted: {error.remedy}.")
    try:
        return load_file(str(real))
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path} is not a valid safetensors file ({err}): {error.remedy}.") from None


def fits_dtype(found: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a file's tensor of dtype `found` may load where the model holds `expected`: the same
    dtype, or a float32/16/bfloat16 onto a float (another precision of the same model). Integers
    onto floats, floats onto masks and float64 onto a lower precision are refused: peftkit writes
    an adapter in its model's dtype, so such a file was not written for this model."""
    return found == expected or (expected.is_floating_point and found in (torch.float32, torch.float16, torch.bfloat16))


def finite(tensors: dict[str, torch.Tensor], path: Path, error: ErrorClass = AdapterFileError) -> None:
    """Refuse float tensors holding NaN or infinity (saved from a diverged run)."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise error(f"{path}: tensor {bad!r} holds NaN or infinite values, so it was saved from a run that "
                    "diverged. Train it again with a lower learning rate, or use an earlier checkpoint.")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order): independent of how
    a file lays them out, so a writer can record it in the file's own metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
