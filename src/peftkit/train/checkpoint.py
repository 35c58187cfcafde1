"""Training checkpoints that lose nothing, written atomically, without pickle.

A checkpoint folder holds

- ``adapter.safetensors`` + ``adapter.json`` — the adapter, a normal peftkit adapter folder
  (so ``peftkit eval --adapter run/checkpoint`` works);
- ``optimizer.safetensors`` — every optimizer state tensor, keyed ``<param index>.<name>``;
- ``rng.safetensors`` — the torch CPU (and CUDA) generator states;
- ``trainer.json`` — step, epoch and position in the epoch, optimizer hyper-parameters and
  scalar state, Python's ``random`` state, best metric, early-stopping count, metric history,
  the settings that must match on resume, and controller states.

The folder is written under a temporary name and replaces the previous one in one step (`core.atomic`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_folder, write_json
from ..core.files import peftkit_format
from ..errors import PeftkitError

FORMAT = "peftkit-checkpoint"
VERSION = 1
STATE = "trainer.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


class CheckpointError(PeftkitError, OSError):
    """A checkpoint is missing, damaged or from an incompatible run."""


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def save(folder: Path, tuned: Any, adapter: str, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         controllers: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write a complete checkpoint to `folder` atomically."""
    tensors, opt_meta = _split_optimizer(optimizer.state_dict())

    with atomic_folder(folder) as tmp:
        peftkit_format.write(tuned, adapter, tmp)
        save_file(tensors, str(tmp / OPTIMIZER))
        save_file(_rng_tensors(), str(tmp / RNG))
        for name, state in (controllers or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / f"controller.{name}.safetensors"))
        doc = {"format": FORMAT, "version": VERSION, **trainer_state, "optimizer": opt_meta,
               "python_rng": _python_rng(), "controllers": sorted(controllers or {})}
        write_json(tmp / STATE, doc, indent=1)


def read(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `folder` (raises `CheckpointError` when unusable)."""
    path = folder / STATE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE}); start without --resume, or point "
                              "--resume at a run's checkpoint folder.")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); resume from another checkpoint or start again.") from None
    if doc.get("format") != FORMAT or not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise CheckpointError(f"{path} is not a peftkit checkpoint this version can read.")
    return doc


def restore(folder: Path, doc: dict[str, Any], tuned: Any, adapter: str, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Load adapter, optimizer and RNG states from checkpoint `folder`; returns controller states."""
    tuned.load_adapter_state(adapter, peftkit_format.read_state(folder))
    try:
        opt_tensors = load_file(str(folder / OPTIMIZER))
        rng = load_file(str(folder / RNG))
    except Exception as err:
        raise CheckpointError(f"checkpoint {folder} is damaged ({err}); resume from another one or start again.") from None
    device = next((p.device for p in tuned.trainable_parameters()), torch.device("cpu"))
    try:
        optimizer.load_state_dict(_join_optimizer({k: v.to(device) for k, v in opt_tensors.items()}, doc["optimizer"]))
    except ValueError as err:  # e.g. a task-head group (--head-lr) that the checkpoint's run did not have
        raise CheckpointError(f"the optimizer state in {folder} does not fit this run ({err}); resume with the "
                              "same --lr / --head-lr settings, or start a new run with another --out.") from None
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = doc["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return {name: load_file(str(folder / f"controller.{name}.safetensors")) for name in doc.get("controllers", [])}
