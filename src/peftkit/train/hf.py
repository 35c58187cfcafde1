"""peftkit inside `transformers.Trainer`.

`PeftkitCallback` does, inside any ``transformers.Trainer``, what peftkit's own trainer does:
``tuned.update(step)`` after every optimizer step (before gradients are zeroed: AdaLoRA-style
methods read them), and at every checkpoint an ``adapter/`` folder (a normal peftkit adapter)
inside ``checkpoint-N/``::

    trainer = transformers.Trainer(model=tuned, args=args, train_dataset=ds, callbacks=[PeftkitCallback()])

With the plain Trainer, checkpoints also hold the whole model's state dict (the Trainer's own
format; resuming works). The Trainer cannot write models with tied weights (most causal LMs:
"Some tensors share memory"); the callback warns about that. `PeftkitTrainer` is the same
Trainer, but its checkpoints and ``save_model()`` hold only the adapter (``adapter.safetensors``
+ ``adapter.json``, loadable with ``peftkit.load``): small, and fine with tied weights.

Under the Trainer's FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``) the
adapter's parameters are ``DTensor`` shards: both write the adapter gathered from every process (all
of them take part), by rank 0 only, in the usual format, with the base fingerprint taken in
``on_init_end``, before the Trainer shards the model (see `train/fsdp.py`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from ..core import files
from ..core.files import peftkit_format
from ..core.tuned import TunedModel
from . import fsdp


def find_tuned(model: Any) -> TunedModel | None:
    """The TunedModel inside `model` (itself, or wrapped by DDP / accelerate / torch.compile)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, TunedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


def _shares_tensors(model: Any) -> bool:
    seen = set()
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            return True
        seen.add(key)
    return False


def _is_sharded(tuned: TunedModel) -> bool:
    return any(fsdp.is_sharded(p) for p in tuned.parameters())


def _uses_fsdp(args: Any) -> bool:
    return bool(getattr(args, "fsdp", None)) and not (getattr(args, "fsdp_config", None) or {}).get("xla", False)


def check_fsdp(tuned: TunedModel) -> None:
    """Refuse, before training, an adapter whose method cannot train sharded (`MethodSpec.unshardable`)."""
    for name in tuned.adapters:
        method = tuned.config_of(name).method
        why = fsdp.unshardable(method)
        if why:
            raise fsdp.ShardingError(f"method {method!r} cannot train under transformers.Trainer's FSDP: "
                                     f"{why}; train it without fsdp (DDP), or use another method.")


def fingerprints(tuned: TunedModel) -> dict[str, dict[str, Any]]:
    """Each adapter's base fingerprint, for an adapter gathered later from shards (take it before sharding)."""
    return {name: peftkit_format.base_fingerprint(tuned, name) for name in tuned.adapters}


def writable(tuned: TunedModel, pinned: dict[str, dict[str, Any]]) -> Any:
    """`tuned` as the adapter writers should see it: itself, or, when sharded by FSDP, its adapters
    gathered whole with the fingerprints `pinned` before sharding. Sharded: every process must call."""
    if not _is_sharded(tuned):
        return tuned
    if not pinned:
        raise fsdp.ShardingError("this model was sharded before the Trainer was built, so its base fingerprint "
                                 "is unknown; pass the unsharded TunedModel to the Trainer (its fsdp_config shards it).")
    return fsdp.gathered(tuned, fsdp.Sharded(mesh=None, fingerprints=pinned))


class PeftkitCallback(TrainerCallback):
    """Calls ``tuned.update(step)`` after each optimizer step and saves the adapter with checkpoints.

    Args:
        save_adapter: write ``checkpoint-N/adapter/`` at every checkpoint (main process only).
    """

    def __init__(self, save_adapter: bool = True) -> None:
        self.save_adapter = save_adapter
        self.in_peftkit_trainer = False
        self.fingerprints: dict[str, dict[str, Any]] = {}  # taken before FSDP shards the model

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuned = find_tuned(model)
        if tuned is not None and _uses_fsdp(args):
            check_fsdp(tuned)
            if not _is_sharded(tuned):  # only rank 0 writes: the others keep placeholders
                self.fingerprints = fingerprints(tuned) if args.process_index == 0 else {n: {} for n in tuned.adapters}
        if tuned is not None and not self.in_peftkit_trainer and _shares_tensors(tuned):
            warnings.warn("this model has tied (shared) weights, which transformers.Trainer cannot write in its "
                          "checkpoints; train it with peftkit.train.PeftkitTrainer (same arguments), whose "
                          "checkpoints hold only the adapter.", stacklevel=2)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuned = find_tuned(model)
        if tuned is not None:
            tuned.update(state.global_step)  # 0-based index of the step just taken

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuned = find_tuned(model)
        if not self.save_adapter or tuned is None:
            return
        view = writable(tuned, self.fingerprints)  # sharded: gathered by every process
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            files.save(view, str(folder / "adapter"))


class PeftkitTrainer(transformers.Trainer):
    """`transformers.Trainer` whose model files are the adapter only (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = [c() if c is PeftkitCallback else c for c in kwargs.pop("callbacks", None) or []]
        if not any(isinstance(c, PeftkitCallback) for c in callbacks):
            callbacks.append(PeftkitCallback(save_adapter=False))
        for c in callbacks:
            if isinstance(c, PeftkitCallback):
                c.in_peftkit_trainer = True
        self._peftkit = next(c for c in callbacks if isinstance(c, PeftkitCallback))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if find_tuned(self.model) is None:
            raise TypeError("PeftkitTrainer needs a peftkit TunedModel (peftkit.attach(model, config)).")

    def _tuned(self) -> TunedModel:
        tuned = find_tuned(self.model)
        assert tuned is not None
        return tuned

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            super().save_model(output_dir, _internal_call)
            return
        # the Trainer's FSDP route would gather the whole model (FULL_STATE_DICT) or write nothing
        # (SHARDED_STATE_DICT); the adapter alone is gathered here, on every process
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tuned = writable(self._tuned(), self._peftkit.fingerprints)  # sharded: gathered by every process
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        names = tuned.adapters
        if len(names) == 1:
            peftkit_format.write(tuned, names[0], Path(output_dir))
        else:
            for name in names:
                (Path(output_dir) / name).mkdir(exist_ok=True)
                peftkit_format.write(tuned, name, Path(output_dir) / name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_adapters(self, folder: str) -> None:
        tuned = self._tuned()
        names = tuned.adapters
        for name in names:
            sub = Path(folder) if len(names) == 1 else Path(folder) / name
            if not (sub / peftkit_format.META).is_file():
                raise ValueError(f"no peftkit adapter in {sub}; was this checkpoint written by PeftkitTrainer?")
            tuned.load_adapter_state(name, peftkit_format.read_state(sub))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.is_fsdp_enabled:  # the sharded model resumes from the Trainer's own FSDP files in the checkpoint
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isdir(best):
            if self.is_fsdp_enabled:
                super()._load_best_model()
                return
            self._load_adapters(best)
