"""`peftkit.load`: an adapter folder (either format, detected) onto a model.

A failed load leaves the model exactly as it was (modules, weights and ``requires_grad`` flags):
files are read and checked before anything is attached (`core/files/checked.py`: nothing a file
names is imported or run, no link out of the folder is followed, sizes are bounded by the files'
real sizes), and `TunedModel.attach` undoes itself on any later error.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import AdapterFileError, BaseMismatchError
from .atomic import existing
from .files import FORMATS, INDEX, detect, read_index
from .tuned import TunedModel


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
    folder = existing(path)  # a save killed between its two renames (no renameat2) left the old copy aside
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist.")
    found = detect(folder)
    if found is not None:
        raw = model.model if isinstance(model, TunedModel) else model
        config, state, saved_name = found.read(raw, folder, check_base)
        tuned = model if isinstance(model, TunedModel) else TunedModel(model)
        try:
            return tuned.attach(config, name or saved_name or "default", trainable=trainable, state=state)
        except BaseMismatchError:
            raise
        except AdapterFileError as err:  # the tensors do not fit what the config builds: name the file
            raise AdapterFileError(f"{folder / found.files[0]}: {err} If not, {AdapterFileError.remedy}.") from None
    if os.path.lexists(folder / INDEX):
        names = read_index(folder)
        chosen = [adapter] if adapter is not None else names
        missing = [n for n in chosen if n not in names]
        if missing:
            raise AdapterFileError(f"{folder} holds adapters {names}, not {missing}.")
        tuned = model if isinstance(model, TunedModel) else TunedModel(model)
        with tuned._all_or_nothing():
            for n in chosen:
                load(tuned, folder / n, name=n if name is None or len(chosen) > 1 else name, trainable=trainable,
                     check_base=check_base)
        return tuned
    markers = ", ".join(f"{f.marker} ({f.name})" for f in FORMATS.values())
    raise AdapterFileError(f"{folder} holds no adapter: expected {markers}, or {INDEX} (several adapters).")

