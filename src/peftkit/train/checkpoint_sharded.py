"""Sharded training checkpoints (``--strategy fsdp``): the trainable state in
`torch.distributed.checkpoint` (DCP) shards, resumable on any number of processes.

The folder holds what a checkpoint of `checkpoint.py` holds, except the optimizer file:

- ``adapter.safetensors`` + ``adapter.json`` — the adapter gathered whole (rank 0 writes it), so
  ``peftkit eval --adapter run/checkpoint`` works as for any checkpoint;
- ``shards/`` — DCP's files: the trainable parameters and the optimizer state, each process
  writing its own shards. DCP records which slice of which tensor each file holds, so a run on
  another number of processes (or one process, without FSDP) reads the slices it needs;
- ``rng.safetensors``, ``controller.<adapter>.safetensors`` and ``trainer.json`` as before, with
  ``"layout": "sharded"`` (checkpoint format version 3) and the size and SHA-256 of every file,
  the shards included.

The folder is written under a temporary name that rank 0 creates and every process writes into,
and replaces the previous checkpoint in one step when all have finished (`core.atomic`); the
processes must share the file system that holds it.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.atomic import atomic_folder, existing, write_json
from ..core.files import peftkit_format
from ..core.files.checked import read_tensors, sha256_file
from . import checkpoint as ckpt
from . import fsdp
from .distributed import Dist, barrier, broadcast

LAYOUT = "sharded"
VERSION = 3
SHARDS = ckpt.SHARDS


def _state(tuned: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves and loads in place: trainable parameters and the optimizer state, by name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"model": fsdp.trainable_state(tuned), "optimizer": get_optimizer_state_dict(tuned, optimizer)}


def save(folder: Path, tuned: Any, adapter: str, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         controllers: dict[str, dict[str, torch.Tensor]], dist: Dist, sharded: fsdp.Sharded) -> None:
    """Write a sharded checkpoint to `folder` atomically. Every process calls this."""
    import torch.distributed.checkpoint as dcp

    view = fsdp.gathered(tuned, sharded, [adapter])  # collective: before rank 0 goes its own way
    state = _state(tuned, optimizer)
    with atomic_folder(folder) if dist.main else contextlib.nullcontext() as tmp:
        tmp = Path(broadcast(dist, str(tmp) if tmp is not None else None))
        dcp.save(state, checkpoint_id=tmp / SHARDS)
        barrier(dist)
        if dist.main:
            peftkit_format.write(view, adapter, tmp)
            save_file(ckpt.rng_tensors(), str(tmp / ckpt.RNG))
            for name, tensors in controllers.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(tmp / ckpt.controller_file(name)))
            files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            doc = {"format": ckpt.FORMAT, "version": VERSION, "layout": LAYOUT, **trainer_state,
                   "optimizer": {"param_groups": [], "scalars": {}}, "python_rng": ckpt.python_rng(),
                   "controllers": sorted(controllers), "files": files}
            doc = json.loads(json.dumps(doc))
            write_json(tmp / ckpt.STATE, {**doc, "sha256": ckpt.doc_sha256(doc)}, indent=1)
    barrier(dist)


def restore(folder: Path, doc: dict[str, Any], tuned: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the trainable parameters, optimizer and RNG states of sharded checkpoint `folder` into
    `tuned` and `optimizer`, sharded or not, on any number of processes; returns controller states.
    The files are checked (sizes, SHA-256) before anything is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    folder = existing(folder)
    ckpt.check_files(folder, doc)
    rng = read_tensors(folder / ckpt.RNG, error=ckpt.CheckpointError)
    controllers = {name: read_tensors(folder / ckpt.controller_file(name), error=ckpt.CheckpointError)
                   for name in doc.get("controllers", [])}
    state = _state(tuned, optimizer)
    try:
        dcp.load(state, checkpoint_id=folder / SHARDS)
    except (CheckpointException, RuntimeError, ValueError, KeyError) as err:  # a missing or misshapen tensor
        raise ckpt.CheckpointError(f"the shards in {folder / SHARDS} do not fit this run ({str(err)[:200]}); "
                                   "resume with the same settings, or start a new run with another --out.") from None
    set_optimizer_state_dict(tuned, optimizer, state["optimizer"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    version, internal, gauss = doc["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return controllers
