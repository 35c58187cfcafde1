"""The Hugging Face PEFT on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each method that overlaps with PEFT registers an `HfCodec` translating its own tensors and
options; this module handles what is common: the files, the task type, and trainable module
copies (PEFT's ``modules_to_save``, stored under the module's own parameter names).
"""

from __future__ import annotations

import json
import os
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
from .checked import FLOATING, finite, metadata, read_json, read_tensors, tensors_sha256

NAME = "hf-peft"
HF_CONFIG = "adapter_config.json"
HF_WEIGHTS = "adapter_model.safetensors"
HF_WEIGHTS_BIN = "adapter_model.bin"
CHECKSUM = "peftkit_sha256"  # in the weights' metadata: PEFT ignores it, peftkit checks it (`tensors_sha256`)
# configuration fields that ask a loader to import classes or run code from elsewhere (``auto_mapping``, which
# PEFT writes for every model, is refused only when it names something outside transformers)
REMOTE_CODE_FIELDS = ("auto_map", "trust_remote_code", "base_model_class", "parent_library", "custom_code")
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
        save_file(tensors, str(tmp), metadata={"format": "pt", CHECKSUM: tensors_sha256(tensors)})
    write_json(folder / HF_CONFIG, hf_config, sort_keys=True)


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``: floats only, finite, and matching the checksum
    peftkit records in the file's metadata when it wrote the file. A pickle (``adapter_model.bin``)
    is refused unopened: unpickling can run code."""
    weights = folder / HF_WEIGHTS
    if not os.path.lexists(weights) and os.path.lexists(folder / HF_WEIGHTS_BIN):
        raise AdapterFileError(
            f"{folder / HF_WEIGHTS_BIN} is a pickle file, which can run code when it is read, so peftkit does not "
            "open it. If you trust it, convert it with PEFT: PeftModel.from_pretrained(base_model, "
            f"'{folder}').save_pretrained('<new folder>', safe_serialization=True), then load the new folder.")
    if not os.path.lexists(weights):
        raise AdapterFileError(f"{folder} has {HF_CONFIG} but no {HF_WEIGHTS}; the adapter folder is incomplete: "
                               f"{AdapterFileError.remedy}.")
    tensors = read_tensors(weights, dtypes=FLOATING)
    recorded = metadata(weights).get(CHECKSUM)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise AdapterFileError(f"{weights} does not match the SHA-256 recorded when peftkit wrote it: the file is "
                               f"corrupted: {AdapterFileError.remedy}.")
    finite(tensors, weights)
    return tensors


def _names_outside_transformers(mapping: Any) -> bool:
    """Whether a PEFT ``auto_mapping`` names anything but a transformers class. PEFT writes one for
    every transformers model (``{"base_model_class": "LlamaForCausalLM", "parent_library":
    "transformers.models.llama.modeling_llama"}``); peftkit never imports it either way."""
    if not isinstance(mapping, dict):
        return True
    library, cls = mapping.get("parent_library"), mapping.get("base_model_class")
    return (set(mapping) - {"base_model_class", "parent_library"} != set() or not isinstance(library, str)
            or not library.startswith("transformers.") or not (isinstance(cls, str) and cls.isidentifier()))


def _refuse_remote_code(hf: dict[str, Any], path: Path) -> None:
    """Refuse a config that asks for code from elsewhere (remote code, a class outside transformers):
    peftkit never imports or runs anything a file names, and says so instead of silently ignoring it."""
    asks = [k for k in REMOTE_CODE_FIELDS if hf.get(k) not in (None, False, "", {}, [])]
    if hf.get("auto_mapping") is not None and _names_outside_transformers(hf["auto_mapping"]):
        asks.insert(0, "auto_mapping")
    if asks:
        raise AdapterFileError(
            f"{path} asks for code to be imported ({asks[0]}: {json.dumps(hf[asks[0]])[:100]}); peftkit never imports "
            "or runs code named by a file. Load the adapter onto a base model you built yourself, after setting "
            f"{asks[0]} to null in the file if you trust it.")


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
    _refuse_remote_code(hf, folder / HF_CONFIG)
    peft_type = hf.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterFileError(f"{folder / HF_CONFIG} has no 'peft_type' name, so it is not a PEFT adapter config: "
                               f"{AdapterFileError.remedy}.")
    copies = hf.get("modules_to_save")
    if copies is not None and not (isinstance(copies, list) and all(isinstance(c, str) for c in copies)):
        raise AdapterFileError(f"{folder / HF_CONFIG}: 'modules_to_save' is not a list of module names: "
                               f"{AdapterFileError.remedy}.")
    try:
        spec = registry.by_peft_type(peft_type)
    except ConfigError as err:
        raise AdapterFileError(f"{folder / HF_CONFIG}: {err} Load it with PEFT itself.") from None
    tensors = _read_hf_tensors(folder)
    copy_sites, copy_state = _take_copies(hf, tensors, model, spec.hf.module_prefix)
    try:
        config, state = spec.hf.from_hf(hf, tensors, model)
        config = config.replace(trainable_modules=copy_sites or None)
    except (PeftkitError, LookupError, TypeError, ValueError) as err:  # the codec read a malformed option
        raise AdapterFileError(f"cannot read PEFT adapter {folder / HF_CONFIG}: {err} ({AdapterFileError.remedy})"
                               ) from None
    return config, {**state, **copy_state}, None
