"""LoRA / rsLoRA / DoRA in the Hugging Face PEFT on-disk format (``peft_type: LORA``).

PEFT keys (after the ``base_model.model.`` prefix the core adds): ``<site>.lora_A.weight`` (r, in),
``<site>.lora_B.weight`` (out, r), ``<site>.lora_magnitude_vector`` (out,), and for embeddings
``<site>.lora_embedding_A`` (r, num) / ``<site>.lora_embedding_B`` (dim, r) — the same tensors
peftkit stores, so only names change. Trained biases are stored by PEFT as full values; peftkit
stores shifts, converted here against the base bias.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ...core.linear import Conv1D
from ...core.registry import HfCodec
from ...core.registry import config as make_config
from ...core.targets import base_at, iter_sites
from ...errors import ConfigError

PREFIX = "base_model.model."
_INIT_TO_HF = {"kaiming": True, "gaussian": "gaussian", "random": False}
_INIT_FROM_HF = {True: "kaiming", "gaussian": "gaussian", False: "random"}
# PEFT options peftkit does not implement; a file using any of them is refused, not half-read.
_UNSUPPORTED = {"lora_bias": False, "layer_replication": None, "use_qalora": False, "target_parameters": None,
                "trainable_token_indices": None, "alora_invocation_tokens": None, "use_bdlora": None}

_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBED_NAMES = {"A": "lora_embedding_A", "B": "lora_embedding_B"}


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    lora_sites, bias_sites = [], []
    for key, value in state.items():
        site, slot, name = key.rsplit(".", 2)
        base = base_at(model, site)
        if slot == "lora":
            if site not in lora_sites:
                lora_sites.append(site)
            names = _EMBED_NAMES if isinstance(base, nn.Embedding) else _NAMES
            tensors[f"{PREFIX}{site}.{names[name]}"] = value
        elif slot == "bias":
            bias_sites.append(site)
            path = f"{site}.base_layer.bias" if site in lora_sites or f"{site}.lora.A" in state else f"{site}.bias"
            tensors[f"{PREFIX}{path}"] = base.bias.detach().float() + value
    rank_pattern, alpha_pattern = {}, {}
    for site in lora_sites:
        r, alpha = config.rank_alpha(site)
        if r != config.r:
            rank_pattern[site] = r
        if alpha != config.alpha:
            alpha_pattern[site] = alpha
    hf = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "init_lora_weights": _INIT_TO_HF[config.init],
        "target_modules": lora_sites,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(isinstance(base_at(model, s), Conv1D) for s in lora_sites),
        "bias": config.bias,
    }
    return hf, tensors


def _pattern_value(patterns: dict[str, Any], site: str) -> Any:
    for key, value in patterns.items():  # PEFT's rule: first key matching as a dotted suffix regex
        if re.match(rf"(.*\.)?({key})$", site):
            return value
    return None


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    odd = [k for k, default in _UNSUPPORTED.items() if hf.get(k, default) not in (default, [], {})]
    init = hf.get("init_lora_weights", True)
    if init not in _INIT_FROM_HF:
        odd.append(f"init_lora_weights={init!r}")
    if odd:
        raise ConfigError(f"this PEFT LoRA adapter uses options peftkit does not support: {', '.join(odd)}.")
    state: dict[str, torch.Tensor] = {}
    sites: list[str] = []
    biases: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path = key.removeprefix(PREFIX)
        if ".modules_to_save." in path or ".original_module." in path:
            continue  # duplicates PEFT writes for wrapped heads with bias="all"
        match = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)$", path)
        if match:
            site, name = match.groups()
            short = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude",
                     "lora_embedding_A": "A", "lora_embedding_B": "B"}[name]
            state[f"{site}.lora.{short}"] = value
            if site not in sites:
                sites.append(site)
        elif path.endswith(".bias"):
            biases[path.removesuffix(".bias").removesuffix(".base_layer")] = value
        else:
            raise ConfigError(f"unexpected tensor {key!r} in a PEFT LoRA adapter.")
    order = {name: i for i, (name, _) in enumerate(iter_sites(model))}
    sites.sort(key=lambda s: order.get(s, len(order)))
    r, alpha = hf.get("r", 8), hf.get("lora_alpha", 8)
    rank_pattern = {s: rank for s in sites if (rank := int(state[f"{s}.lora.A"].shape[0])) != r}
    alpha_pattern = {}
    for s in sites:
        value = _pattern_value(hf.get("alpha_pattern") or {}, s)
        if value is not None and value != alpha:
            alpha_pattern[s] = value
    for site, value in biases.items():
        state[f"{site}.bias.shift"] = value.float() - base_at(model, site).bias.detach().float()
    config = make_config(
        "lora", r=r, alpha=alpha, dropout=hf.get("lora_dropout", 0.0), rslora=bool(hf.get("use_rslora")),
        dora=bool(hf.get("use_dora")), init=_INIT_FROM_HF[init], bias=hf.get("bias", "none"),
        targets=sites, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, trainable_modules=None,
    )
    return config, state


LORA_CODEC = HfCodec(peft_type="LORA", to_hf=to_hf, from_hf=from_hf)
