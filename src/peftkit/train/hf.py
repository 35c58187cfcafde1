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
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from ..core.files import peftkit_format
from ..core.tuned import TunedModel


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


class PeftkitCallback(TrainerCallback):
    """Calls ``tuned.update(step)`` after each optimizer step and saves the adapter with checkpoints.

    Args:
        save_adapter: write ``checkpoint-N/adapter/`` at every checkpoint (main process only).
    """

    def __init__(self, save_adapter: bool = True) -> None:
        self.save_adapter = save_adapter
        self.in_peftkit_trainer = False

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuned = find_tuned(model)
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
        if not self.save_adapter or tuned is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            tuned.save(str(folder / "adapter"))


class PeftkitTrainer(transformers.Trainer):
    """`transformers.Trainer` whose model files are the adapter only (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = [c() if c is PeftkitCallback else c for c in kwargs.pop("callbacks", None) or []]
        if not any(isinstance(c, PeftkitCallback) for c in callbacks):
            callbacks.append(PeftkitCallback(save_adapter=False))
        for c in callbacks:
            if isinstance(c, PeftkitCallback):
                c.in_peftkit_trainer = True
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if find_tuned(self.model) is None:
            raise TypeError("PeftkitTrainer needs a peftkit TunedModel (peftkit.attach(model, config)).")

    def _tuned(self) -> TunedModel:
        tuned = find_tuned(self.model)
        assert tuned is not None
        return tuned

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tuned = self._tuned()
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
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isdir(best):
            self._load_adapters(best)
