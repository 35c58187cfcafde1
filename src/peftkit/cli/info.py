"""``peftkit info``: what an adapter folder holds, read from its files alone (no model is loaded)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError
from .common import adapter_folder, emit, subcommand


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "info", "describe an adapter folder", "peftkit info runs/minilm-rotten-tomatoes-lora/adapter")
    p.add_argument("path", help="adapter folder (a run's adapter/ or best/, or a folder saved by peftkit or "
                                "Hugging Face PEFT)")
    p.set_defaults(run=run)


def _tensor_counts(path: Path) -> tuple[int, int]:
    """(parameters, tensors) from a safetensors file's header, checked against the file's size."""
    from ..core.files.checked import header

    entries = header(path)
    return sum(math.prod(shape) for _, shape in entries.values()), len(entries)


def describe(folder: Path) -> dict[str, Any]:
    """The description ``peftkit info --json`` prints."""
    from ..core.files import INDEX, hf_format, peftkit_format, read_index
    from ..core.files.checked import read_json
    from ..train.models import folder_bytes

    if (folder / peftkit_format.META).is_file():
        meta = read_json(folder / peftkit_format.META)
        params, tensors = _tensor_counts(folder / peftkit_format.WEIGHTS)
        base = meta.get("base", {})
        return {"format": peftkit_format.NAME, "name": meta.get("name"), "method": meta.get("method"),
                "config": meta.get("config"), "sites": sorted(base.get("shapes", {})), "parameters": params,
                "tensors": tensors, "bytes": folder_bytes(folder),
                "base": {k: base.get(k) for k in ("architecture", "model_type", "name_or_path", "weights_sha256")}}
    if (folder / hf_format.HF_CONFIG).is_file():
        conf = read_json(folder / hf_format.HF_CONFIG)
        weights = folder / hf_format.HF_WEIGHTS
        params, tensors = _tensor_counts(weights) if weights.is_file() else (0, 0)
        return {"format": hf_format.NAME, "method": conf.get("peft_type"), "config": conf,
                "sites": conf.get("target_modules"), "parameters": params, "tensors": tensors,
                "bytes": folder_bytes(folder), "base": {"name_or_path": conf.get("base_model_name_or_path")}}
    if (folder / INDEX).is_file():
        names = read_index(folder)
        return {"format": "multi", "adapters": {n: describe(folder / n) for n in names}, "bytes": folder_bytes(folder)}
    raise AdapterFileError(f"{folder} holds no adapter (no {peftkit_format.META}, {hf_format.HF_CONFIG} or {INDEX}).")


def _text(path: str, info: dict[str, Any]) -> str:
    if info["format"] == "multi":
        return "\n\n".join(_text(f"{path}/{n}", sub) for n, sub in info["adapters"].items())
    base = info.get("base", {})
    sites = info.get("sites") or []
    shown = ", ".join(sites[:4]) + (f", ... ({len(sites)} sites)" if len(sites) > 4 else "")
    options = {k: v for k, v in (info.get("config") or {}).items() if k != "method" and v not in (None, {}, [])}
    return "\n".join([
        f"{path}: {info['method']} adapter ({info['format']} format)",
        f"  options: {json.dumps(options, default=str)}",
        f"  sites: {shown}",
        f"  parameters: {info['parameters']:,} in {info['tensors']} tensors; {info['bytes'] / 1024:.1f} KiB on disk",
        "  base: " + ", ".join(f"{k}={v}" for k, v in base.items() if v),
    ])


def run(args: argparse.Namespace) -> int:
    folder = adapter_folder(args.path, what="peftkit info")
    info = describe(folder)
    emit(args, {"path": str(folder), **info}, _text(str(folder), info))
    return 0
