"""AdaLoRA in the Hugging Face PEFT on-disk format (``peft_type: ADALORA``).

PEFT keys (after ``base_model.model.``): ``<site>.lora_A`` (k, in) = Q, ``<site>.lora_B`` (out, k)
= P, ``<site>.lora_E`` (k, 1) = Λ, pruned to the kept ranks k when the config's ``rank_pattern``
(``{"<site>.lora_E": [init_r booleans]}``) is set, full (k = init_r) when it is null. PEFT scales
by ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r`` even after pruning — the same
constant peftkit uses, so tensors map one to one. peftkit's `budget` option has no PEFT field: it
is written as the nearest average ``target_r``.
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
SLOT = "adalora"
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "layer_replication": None,
                "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
                "use_rslora": False, "alora_invocation_tokens": None}
_KEY = re.compile(r"(.+)\.lora_([ABE])$")


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        site, slot, name = key.rsplit(".", 2)
        if slot != SLOT:
            raise ConfigError(f"unexpected tensor {key!r} in an AdaLoRA adapter.")
        parts.setdefault(site, {})[name] = value
    sites = list(parts)
    masks = {site: p["mask"] for site, p in parts.items()}
    tensors: dict[str, torch.Tensor] = {}
    for site, p in parts.items():  # PEFT files always hold only the kept ranks
        keep = p["mask"] if p["A"].shape[0] == p["mask"].shape[0] else slice(None)
        tensors[f"{PREFIX}{site}.lora_A"] = p["A"][keep]
        tensors[f"{PREFIX}{site}.lora_B"] = p["B"][:, keep]
        tensors[f"{PREFIX}{site}.lora_E"] = p["E"][keep].unsqueeze(1)  # (k, 1)
    pruned = any(not bool(m.all()) for m in masks.values())
    hf = {
        "peft_type": "ADALORA",
        "init_r": config.init_r,
        "target_r": max(1, round(config.target_budget(len(sites)) / max(len(sites), 1))),
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "tinit": config.t_init,
        "tfinal": config.t_final,
        "deltaT": config.delta_t,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg,
        "total_step": config.total_steps,
        "target_modules": sites,
        "rank_pattern": {f"{s}.lora_E": [bool(b) for b in masks[s].tolist()] for s in sites} if pruned else None,
        "fan_in_fan_out": any(isinstance(base_at(model, s), Conv1D) for s in sites),
        "bias": "none",
    }
    return hf, tensors


def _masks(hf: dict[str, Any], sites: list[str], init_r: int) -> dict[str, torch.Tensor]:
    """Per-site keep-masks from PEFT's rank_pattern (keys ``<site>.lora_E[.<adapter>]``)."""
    pattern = {key.split(".lora_E")[0]: value for key, value in (hf.get("rank_pattern") or {}).items()}
    masks = {}
    for site in sites:
        value = pattern.get(site)
        if value is None:
            masks[site] = torch.ones(init_r, dtype=torch.bool)
            continue
        if len(value) != init_r:
            raise ConfigError(f"rank_pattern for {site} has {len(value)} entries but init_r is {init_r}.")
        masks[site] = torch.tensor([bool(v) for v in value], dtype=torch.bool)
    return masks


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    odd = [f"{k}={hf[k]!r}" for k, default in _UNSUPPORTED.items() if hf.get(k, default) not in (default, [], {})]
    if odd:
        raise ConfigError(f"this PEFT AdaLoRA adapter uses options peftkit does not support: {', '.join(odd)}.")
    init_r = int(hf.get("init_r", 12))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if match is None:
            raise ConfigError(f"unexpected tensor {key!r} in a PEFT AdaLoRA adapter.")
        site, name = match.groups()
        found.setdefault(site, {})[name] = value.reshape(-1) if name == "E" else value
    order = {name: i for i, (name, _) in enumerate(iter_sites(model))}
    sites = sorted(found, key=lambda s: order.get(s, len(order)))
    masks = _masks(hf, sites, init_r)
    state: dict[str, torch.Tensor] = {}
    for site in sites:
        parts, kept = found[site], int(masks[site].sum())
        if set(parts) != {"A", "B", "E"} or parts["E"].shape[0] != kept:
            raise ConfigError(f"{site}: expected lora_A/lora_B/lora_E with {kept} ranks (its rank_pattern), got "
                              f"{ {k: tuple(v.shape) for k, v in parts.items()} }.")
        state.update({f"{site}.{SLOT}.{k}": v for k, v in parts.items()})
        state[f"{site}.{SLOT}.mask"] = masks[site]
    alpha = hf.get("lora_alpha", 8)
    config = make_config(
        "adalora", init_r=init_r, target_r=min(hf.get("target_r", 8), init_r), total_steps=hf.get("total_step"),
        t_init=hf.get("tinit", 0), t_final=hf.get("tfinal", 0), delta_t=hf.get("deltaT", 1),
        beta1=hf.get("beta1", 0.85), beta2=hf.get("beta2", 0.85), orth_reg=hf.get("orth_reg_weight", 0.5),
        alpha=alpha if alpha > 0 else float(init_r), dropout=hf.get("lora_dropout", 0.0), targets=sites,
        trainable_modules=None,
    )
    return config, state


ADALORA_CODEC = HfCodec(peft_type="ADALORA", to_hf=to_hf, from_hf=from_hf)
