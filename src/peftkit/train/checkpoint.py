"""Training checkpoints that lose nothing, written atomically, without pickle.

A checkpoint folder holds

- ``adapter.safetensors`` + ``adapter.json`` — the adapter, a normal peftkit adapter folder
  (so ``peftkit eval --adapter run/checkpoint`` works);
- ``optimizer.safetensors`` — every optimizer state tensor, keyed ``<param index>.<name>``;
- ``rng.safetensors`` — the torch CPU (and CUDA) generator states;
- ``controller.<adapter>.safetensors`` — training-time controller states (e.g. AdaLoRA's budget);
- ``trainer.json`` — step, epoch and position in the epoch, optimizer hyper-parameters and
  scalar state, Python's ``random`` state, best metric, early-stopping count, metric history,
  the settings that must match on resume, controller names, the size and SHA-256 of every other
  file, and its own SHA-256 (format version 2; version 1 had no checksums).

Under ``--strategy fsdp`` the optimizer state is sharded instead (`checkpoint_sharded.py`: format
version 3, ``"layout": "sharded"``).

The folder is written under a temporary name and replaces the previous one in one step
(`core.atomic`). Reading checks everything (sizes, checksums, names, shapes, dtypes) before
anything is restored, so a refused checkpoint changes neither the model nor the optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.atomic import atomic_folder, existing, write_json
from ..core.files import peftkit_format
from ..core.files.checked import finite, inside, read_json, read_tensors, sha256_file
from ..errors import AdapterFileError, CheckpointError, PeftkitError

FORMAT = "peftkit-checkpoint"
VERSION = 2
SHARDED_VERSION = 3  # a sharded checkpoint (`checkpoint_sharded.py`)
STATE = "trainer.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint files
OPTIMIZER_TENSORS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's per-parameter state

__all__ = ["CheckpointError", "read", "restore", "save", "verify"]


def controller_file(name: str) -> str:
    return f"controller.{name}.safetensors"


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


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def doc_sha256(doc: dict[str, Any]) -> str:
    """SHA-256 of a trainer state without its own checksum, over canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(folder: Path, tuned: Any, adapter: str, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         controllers: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write a complete checkpoint to `folder` atomically."""
    tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    with atomic_folder(folder) as tmp:
        peftkit_format.write(tuned, adapter, tmp)
        save_file(tensors, str(tmp / OPTIMIZER))
        save_file(rng_tensors(), str(tmp / RNG))
        for name, state in (controllers or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / controller_file(name)))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        doc = {"format": FORMAT, "version": VERSION, **trainer_state, "optimizer": opt_meta,
               "python_rng": python_rng(), "controllers": sorted(controllers or {}), "files": files}
        doc = json.loads(json.dumps(doc))  # as it reads back (tuples as lists), so the checksum matches
        write_json(tmp / STATE, {**doc, "sha256": doc_sha256(doc)}, indent=1)


def _doc_problem(doc: dict[str, Any]) -> str | None:
    """What is malformed in a trainer state (None: nothing), checked before any of it is used."""
    fields = {"step": int, "bad_evals": int, "elapsed": int | float, "history": list,
              "optimizer": dict, "python_rng": list, "controllers": list}
    required = ("step", "optimizer", "python_rng")
    wrong = [k for k, kind in fields.items() if (k in doc or k in required)
             and (not isinstance(doc.get(k), kind) or isinstance(doc.get(k), bool))]
    if wrong or doc["step"] < 0:
        return f"{(wrong or ['step'])[0]!r} is missing, negative or of the wrong type"
    if not isinstance(doc.get("best"), dict | None) or not isinstance(doc.get("identity", {}), dict):
        return "'best' or 'identity' is malformed"
    opt = doc.get("optimizer", {})
    if not (isinstance(opt.get("param_groups"), list) and all(isinstance(g, dict) for g in opt["param_groups"])
            and isinstance(opt.get("scalars", {}), dict)
            and all(k.isdigit() and isinstance(v, dict) for k, v in opt.get("scalars", {}).items())):
        return "the optimizer's 'param_groups' or 'scalars' are malformed"
    rng = doc["python_rng"]
    try:
        random.Random().setstate((rng[0], tuple(rng[1]), rng[2]))
    except (TypeError, ValueError, IndexError, OverflowError):
        return "'python_rng' is not a Python random state"
    names = doc.get("controllers", [])
    if not all(isinstance(n, str) and peftkit_format.ADAPTER_NAME.match(n) for n in names):
        return "'controllers' are not adapter names"
    return None


def check_files(folder: Path, doc: dict[str, Any]) -> None:
    """The files a version-2 checkpoint records are exactly those it holds, each a regular file in
    the folder with the recorded size and SHA-256."""
    files = doc.get("files")
    if not (isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())):
        raise CheckpointError(f"{folder / STATE} has no valid record of its files; the checkpoint is damaged: "
                              f"{CheckpointError.remedy}.")
    if is_sharded(doc):  # its own files, and whatever torch.distributed.checkpoint wrote under shards/
        shards = folder / SHARDS
        needed = {peftkit_format.META, peftkit_format.WEIGHTS, RNG,
                  *(f"{SHARDS}/{p.relative_to(shards).as_posix()}" for p in shards.rglob("*") if p.is_file()),
                  *(controller_file(n) for n in doc.get("controllers", []))}
    else:
        needed = {peftkit_format.META, peftkit_format.WEIGHTS, OPTIMIZER, RNG,
                  *(controller_file(n) for n in doc.get("controllers", []))}
    if set(files) != needed:
        raise CheckpointError(f"{folder / STATE} records other files than a checkpoint holds; the checkpoint is "
                              f"damaged: {CheckpointError.remedy}.")
    for name in sorted(needed):
        real = inside(folder / name, CheckpointError)
        if real.stat().st_size != files[name].get("bytes") or sha256_file(real) != files[name].get("sha256"):
            raise CheckpointError(f"{folder / name} does not match the size and SHA-256 recorded in {STATE}: the "
                                  f"file is truncated or corrupted: {CheckpointError.remedy}.")


def is_sharded(doc: dict[str, Any]) -> bool:
    """Whether a trainer state (`read`) is that of a sharded checkpoint (`checkpoint_sharded.py`)."""
    return doc.get("layout") == "sharded"


def read(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `folder`, checked (raises `CheckpointError` when unusable)."""
    folder = existing(folder)
    path = folder / STATE
    if not os.path.lexists(path):
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE}); start without --resume, or point "
                              "--resume at a run's checkpoint folder.")
    doc = read_json(path, error=CheckpointError)
    version = doc.get("version")
    if doc.get("format") != FORMAT or type(version) is not int or version < 1:
        raise CheckpointError(f"{path} is not a peftkit checkpoint: {CheckpointError.remedy}.")
    if version > SHARDED_VERSION:
        raise CheckpointError(f"{path} was written by a newer peftkit (checkpoint version {version}; this one reads "
                              f"up to {SHARDED_VERSION}): upgrade peftkit to resume it, or start the run again.")
    if (version == SHARDED_VERSION) != is_sharded(doc):
        raise CheckpointError(f"{path} is malformed: version {version} with layout {doc.get('layout')!r}; "
                              f"{CheckpointError.remedy}.")
    if version >= 2 and doc.get("sha256") != doc_sha256(doc):
        raise CheckpointError(f"{path} does not match its recorded SHA-256: the file is corrupted: "
                              f"{CheckpointError.remedy}.")
    problem = _doc_problem(doc)
    if problem:
        raise CheckpointError(f"{path} is malformed: {problem}; {CheckpointError.remedy}.")
    return doc


def verify(folder: Path) -> dict[str, Any]:
    """Check checkpoint `folder` whole without a model (its state, every file's size and SHA-256,
    the adapter and tensor files); returns its trainer state. Raises `CheckpointError`."""
    doc = read(folder)
    folder = existing(folder)
    if doc["version"] >= 2:
        check_files(folder, doc)
    optimizer = () if is_sharded(doc) else (OPTIMIZER,)  # shards: checked by their SHA-256 above
    for name in (peftkit_format.WEIGHTS, *optimizer, RNG, *(controller_file(n) for n in doc.get("controllers", []))):
        read_tensors(folder / name, error=CheckpointError)
    return doc


@dataclass
class _Loaded:
    """A checkpoint's tensors, read and checked, not yet applied."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    controllers: dict[str, dict[str, torch.Tensor]]


def _optimizer_problem(tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> str | None:
    """What in the saved optimizer tensors does not fit `optimizer`'s parameters (None: nothing)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not (index.isdigit() and int(index) < len(params) and name in OPTIMIZER_TENSORS):
            return f"tensor {key!r} names no state of this run's {len(params)} parameters"
        param = params[int(index)]
        shape = () if name == "step" else tuple(param.shape)
        dtype_ok = value.is_floating_point() if name == "step" else value.dtype == param.dtype  # AdamW's own
        if not dtype_ok or tuple(value.shape) != shape:
            return (f"tensor {key!r} is {value.dtype} {tuple(value.shape)}, where "
                    f"{'a float' if name == 'step' else param.dtype} {shape} is expected")
    return None


def _load(folder: Path, doc: dict[str, Any], optimizer: torch.optim.Optimizer) -> _Loaded:
    """Read and check every tensor of checkpoint `folder` (`doc`: its `read` state) for `optimizer`."""
    if doc["version"] >= 2:
        check_files(folder, doc)
    try:
        adapter = peftkit_format.read_state(folder, error=CheckpointError)
    except AdapterFileError as err:  # adapter.json of the checkpoint
        raise CheckpointError(f"{err} ({CheckpointError.remedy})") from None
    opt = read_tensors(folder / OPTIMIZER, error=CheckpointError)
    finite(opt, folder / OPTIMIZER, CheckpointError)
    problem = _optimizer_problem(opt, optimizer)
    if problem:
        raise CheckpointError(f"{folder / OPTIMIZER} does not fit this run: {problem}; {CheckpointError.remedy}.")
    rng = read_tensors(folder / RNG, error=CheckpointError)
    like = torch.get_rng_state()
    if any(k != "torch" and not k.startswith("cuda.") for k in rng):
        problem = f"it holds tensors that are not generator states ({sorted(rng)[:3]})"
    elif rng.get("torch") is None or rng["torch"].dtype != like.dtype or rng["torch"].shape != like.shape:
        problem = f"it holds no torch generator state of {like.dtype} {tuple(like.shape)}"
    if problem:
        raise CheckpointError(f"{folder / RNG} is unusable: {problem}; {CheckpointError.remedy}.")
    try:
        joined = _join_optimizer(opt, doc["optimizer"])
    except (LookupError, TypeError, ValueError) as err:
        raise CheckpointError(f"the optimizer state in {folder / STATE} is malformed ({err}); "
                              f"{CheckpointError.remedy}.") from None
    controllers = {}
    for name in doc.get("controllers", []):
        controllers[name] = read_tensors(folder / controller_file(name), error=CheckpointError)
    return _Loaded(adapter, joined, rng, controllers)


def restore(folder: Path, doc: dict[str, Any], tuned: Any, adapter: str,
            optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Load adapter, optimizer and RNG states from checkpoint `folder`; returns controller states.
    Everything is read and checked first: a refused checkpoint changes nothing."""
    folder = existing(folder)
    loaded = _load(folder, doc, optimizer)
    device = next((p.device for p in tuned.trainable_parameters()), torch.device("cpu"))
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict({**loaded.optimizer, "state": {
            i: {k: v.to(device) for k, v in s.items()} for i, s in loaded.optimizer["state"].items()}})
    except (ValueError, KeyError, TypeError) as err:  # e.g. a task-head group (--head-lr) the checkpoint's run lacked
        raise CheckpointError(f"the optimizer state in {folder} does not fit this run ({err}); resume with the "
                              "same --lr / --head-lr settings, or start a new run with another --out.") from None
    try:
        tuned.load_adapter_state(adapter, loaded.adapter)
    except PeftkitError as err:
        optimizer.load_state_dict(before)
        raise CheckpointError(f"{folder / peftkit_format.WEIGHTS} does not fit this run ({err}); resume with the "
                              "same settings, or start a new run with another --out.") from None
    torch.set_rng_state(loaded.rng["torch"])
    cuda = [loaded.rng[k] for k in sorted(loaded.rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = doc["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return loaded.controllers
