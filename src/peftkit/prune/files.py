"""Saving and loading pruned models.

Unstructured / N:M pruning keeps every shape: the model is a plain Hugging Face folder whose weights
hold zeros. Structured pruning changes shapes: `save_pruned` writes the folder plus ``pruning.json``
(every linear layer's (out, in) shape and the attention modules' head counts), and `load_pruned`
rebuilds the model from its config, reshapes those layers, then loads the weights strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.atomic import atomic_folder, write_json
from ..core.linear import Conv1D, is_linear, linear_weight
from ..core.targets import iter_sites, set_site
from ..errors import PeftkitError
from .report import PruneReport
from .structured import _HEAD_ATTRS, _KV_ATTRS

PRUNING_FILE = "pruning.json"
FORMAT = "peftkit-pruning"
_ATTRS = (*_HEAD_ATTRS, *_KV_ATTRS, "all_head_size")


class PrunedModelError(PeftkitError, OSError):
    """A pruned model folder is missing files or does not match its description."""


def save_pruned(model: nn.Module, path: str | Path, report: PruneReport | None = None) -> Path:
    """Write `model` with ``save_pretrained`` plus ``pruning.json`` into folder `path`, replacing it
    in one step (an earlier pruned model there is replaced; a folder holding anything else is refused);
    returns the folder."""
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / PRUNING_FILE).is_file())):
        raise PrunedModelError(f"refusing to overwrite {folder}: it is not empty and holds no pruned model; "
                               "choose a new folder.")
    shapes = {name: list(linear_weight(m).shape) for name, m in iter_sites(model) if is_linear(m)}
    attributes = {name: {a: getattr(m, a) for a in _ATTRS if isinstance(getattr(m, a, None), int)}
                  for name, m in model.named_modules() if "attention" in type(m).__name__.lower()}
    doc = {"format": FORMAT, "version": 1, "shapes": shapes, "attributes": {k: v for k, v in attributes.items() if v},
           "report": report.as_dict() if report is not None else None}
    with atomic_folder(folder) as tmp:
        model.save_pretrained(str(tmp))
        write_json(tmp / PRUNING_FILE, doc)
    return folder


def _model_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise PrunedModelError(f"the config names no transformers model class ({archs}); pass model_class=...")
    return cls


def _empty_like(module: nn.Module, shape: tuple[int, int]) -> nn.Module:
    out_f, in_f = shape
    if isinstance(module, Conv1D):
        return Conv1D(out_f, in_f)
    return nn.Linear(in_f, out_f, bias=getattr(module, "bias", None) is not None,
                     dtype=module.weight.dtype)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise PrunedModelError(f"{folder / name} is missing; save the model with save_pruned().")
        state.update(load_file(str(folder / name)))
    return state


def load_pruned(path: str | Path, *, model_class: Any = None) -> nn.Module:
    """Load a folder written by `save_pruned` (or any pruned Hugging Face folder).

    Raises:
        PrunedModelError: missing files, or weights that do not fit the recorded shapes.
    """
    from transformers import AutoConfig

    folder = Path(path)
    spec_file = folder / PRUNING_FILE
    config = AutoConfig.from_pretrained(str(folder))
    cls = model_class or _model_class(config)
    if not spec_file.is_file():
        return cls.from_pretrained(str(folder)).eval()  # shapes unchanged (unstructured), or none recorded
    doc = json.loads(spec_file.read_text())
    if doc.get("format") != FORMAT:
        raise PrunedModelError(f"{spec_file} is not a peftkit pruning description.")
    model = cls(config)
    modules = dict(iter_sites(model))
    for name, shape in doc["shapes"].items():
        if name not in modules:
            raise PrunedModelError(f"{spec_file} names {name!r}, which {cls.__name__} does not have.")
        if list(linear_weight(modules[name]).shape) != shape:
            set_site(model, name, _empty_like(modules[name], tuple(shape)))
    for name, attrs in doc.get("attributes", {}).items():
        for attr, value in attrs.items():
            setattr(model.get_submodule(name), attr, value)
    missing, unexpected = model.load_state_dict(_state(folder), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise PrunedModelError(f"{folder} does not fit its recorded shapes: missing {sorted(set(missing) - tied)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}.")
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and sum(p is target for p in params.values()) > 1
