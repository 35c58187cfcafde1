"""Finding and loading the base model and tokenizer for a task, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from . import assets
from .hf_logging import quiet_transformers

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class ModelError(PeftkitError, OSError):
    """The base model cannot be found or loaded."""


def resolve(name: str) -> str:
    """A local folder for `name`: an embedded model name or a Hugging Face model folder.

    Raises:
        AssetError / ModelError: unknown name, missing package, or a folder without config.json.
    """
    if assets.is_model_name(name):
        return assets.model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder that "
                             "save_pretrained() wrote, or an embedded name: " + ", ".join(assets.MODELS) + ".")
        return str(path)
    if path.exists():
        raise ModelError(f"{path} is a file; --model takes a model folder or an embedded name ({', '.join(assets.MODELS)}).")
    return assets.model_path(name)  # raises: unknown name, with the closest embedded one


def position_limit(path: str) -> int | None:
    """How many token positions a model with learned (absolute) position embeddings can read; None
    for models without such a table (rotary positions extrapolate, if not well)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("position_embedding_type", "absolute") != "absolute" or any("rope" in key for key in config):
        return None
    limit = config.get("n_positions") or config.get("max_position_embeddings")
    return limit if isinstance(limit, int) and limit > 0 else None


def is_causal(path: str) -> bool:
    """Whether the folder's model generates text (a causal / seq2seq LM) rather than encodes it."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}/config.json ({err}).") from None
    return any(str(a).endswith(CAUSAL_SUFFIXES) for a in config.get("architectures") or [])


def tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load(path: str, task: str, num_labels: int | None = None, pad_id: int | None = None,
         dtype: torch.dtype | None = None, *, meta: bool = False) -> nn.Module:
    """The model for `task`: a sequence classifier with `num_labels`, or a causal LM. `meta`: its
    structure only, on the meta device (no weights read or allocated), from the folder's config."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    try:
        with quiet_transformers():
            if meta:
                model = _structure(path, task, num_labels, dtype)
            elif task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2, **kwargs)
                if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
                    model.config.pad_token_id = pad_id  # decoder classifiers pool the last non-pad token
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load {path} for {task}: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise ModelError(f"{path} has a classification head for another number of classes than the "
                         f"{num_labels} asked for; use data with the head's classes, or a model folder without a "
                         "head (the bare encoder).") from None
    if task == "classification" and pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return model


def _structure(path: str, task: str, num_labels: int | None, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classification":
        config = AutoConfig.from_pretrained(path, num_labels=num_labels or 2)
        auto = AutoModelForSequenceClassification
    else:
        config, auto = AutoConfig.from_pretrained(path), AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    return model.eval()  # as from_pretrained leaves it


def saved_weight_names(path: str) -> set[str] | None:
    """Tensor names in the folder's safetensors files (headers only); None without such files."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names.update(handle.keys())
    return names


def set_dropout(model: nn.Module, p: float) -> int:
    """Give every dropout in `model` probability `p`: ``nn.Dropout`` modules, and the float
    ``attention_dropout`` that transformers' attention layers without a dropout module read.
    Returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            count += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            count += 1
    return count


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
