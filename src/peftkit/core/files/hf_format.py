"""The Hugging Face PEFT on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each method that overlaps with PEFT registers an `HfCodec` translating its own tensors and
options; this module handles what is common: the files, the task type, and trainable module
copies (PEFT's ``modules_to_save``, stored under the module's own parameter names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...errors import AdapterFileError, ConfigError, PeftkitError
from .. import registry
from ..atomic import atomic_file, write_json
from ..protocol import COPY_SLOT
from ..targets import iter_sites, matches
from .checked import read_json, read_tensors

NAME = "hf-peft"
HF_CONFIG = "adapter_config.json"
HF_WEIGHTS = "adapter_model.safetensors"
HF_WEIGHTS_BIN = "adapter_model.bin"
Tensors = dict[str, torch.Tensor]
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))
_COPY_MARK = f".{COPY_SLOT}.values."


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _split_copies(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    own, copies = {}, {}
    for key, value in state.items():
        if _COPY_MARK in key:
            site, param = key.split(_COPY_MARK)
            copies.setdefault(site, {})[param.replace("__", ".")] = value
        else:
            own[key] = value
    return own, copies


def write(tuned: Any, name: str, folder: Path) -> None:
    """Write adapter `name` of `tuned` (a TunedModel) as PEFT's two files into `folder`."""
    config = tuned.config_of(name)
    spec = registry.get(config.method)
    if spec.hf is None:
        with_codec = sorted(s.name for s in registry.specs() if s.hf)
        raise AdapterFileError(f"method {config.method!r} has no Hugging Face PEFT equivalent; save it with "
                               f"format='peftkit'. Methods PEFT can read: {', '.join(with_codec)}.")
    own, copies = _split_copies(tuned.adapter_state(name))
    hf_config, tensors = spec.hf.to_hf(config, own, tuned.model)
    for site, params in copies.items():
        tensors.update({f"{spec.hf.module_prefix}{site}.{p}": v for p, v in params.items()})
    model_config = getattr(tuned.model, "config", None)
    hf_config = {
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "task_type": task_type(tuned.model),
        "inference_mode": True,
        "revision": None,
        "modules_to_save": list(copies) or None,
        **hf_config,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(folder / HF_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(folder / HF_CONFIG, hf_config, sort_keys=True)


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / HF_WEIGHTS).is_file():
        return read_tensors(folder / HF_WEIGHTS)
    if (folder / HF_WEIGHTS_BIN).is_file():
        try:  # interop only: PEFT's legacy pickle format, loaded without executing code
            return torch.load(folder / HF_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise AdapterFileError(f"{folder / HF_WEIGHTS_BIN} could not be read safely: {err}") from None
    raise AdapterFileError(f"{folder} has {HF_CONFIG} but no {HF_WEIGHTS}; the adapter folder is incomplete.")


def _take_copies(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module, prefix: str
                 ) -> tuple[list[str], dict[str, torch.Tensor]]:
    sites, state = [], {}
    for entry in hf.get("modules_to_save") or []:
        for site, module in iter_sites(model):
            if site in sites or not matches(entry, site):
                continue
            keys = {p: f"{prefix}{site}.{p}" for p, _ in module.named_parameters()}
            if not all(k in tensors for k in keys.values()):
                continue
            sites.append(site)
            for param, key in keys.items():
                state[f"{site}.{COPY_SLOT}.values.{param.replace('.', '__')}"] = tensors.pop(key)
    return sites, state


def read(model: nn.Module, folder: Path, check_base: bool) -> tuple[Any, Tensors, str | None]:
    """(config, tensors in peftkit's keys, None) of the PEFT adapter in `folder`, for `model` (a
    plain model). PEFT files carry no fingerprint of their base, so `check_base` has nothing to check."""
    hf = read_json(folder / HF_CONFIG)
    if "peft_type" not in hf:
        raise AdapterFileError(f"{folder / HF_CONFIG} has no 'peft_type'; it is not a PEFT adapter config.")
    try:
        spec = registry.by_peft_type(hf["peft_type"])
    except ConfigError as err:
        raise AdapterFileError(str(err)) from None
    tensors = _read_hf_tensors(folder)
    copy_sites, copy_state = _take_copies(hf, tensors, model, spec.hf.module_prefix)
    try:
        config, state = spec.hf.from_hf(hf, tensors, model)
        config = config.replace(trainable_modules=copy_sites or None)
    except PeftkitError as err:
        raise AdapterFileError(f"cannot read PEFT adapter {folder}: {err}") from None
    return config, {**state, **copy_state}, None
