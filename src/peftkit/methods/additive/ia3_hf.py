"""(IA)³ in the Hugging Face PEFT format (``peft_type: IA3``).

PEFT keys (after ``base_model.model.``): ``<site>.ia3_l``, shaped (1, in) for feed-forward sites
(input scaled) and (out, 1) otherwise; peftkit stores the same vector flat. The config lists the
adapted modules (``target_modules``) and those scaled on the input (``feedforward_modules``),
matched like PEFT does (exact name or dotted suffix; a string is a regular expression).
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
_SUFFIX = ".ia3_l"


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    _, feedforward_entries = config.placement(model)
    tensors, targets, feedforward, conv1d = {}, [], [], False
    for key, value in state.items():
        site = key.rsplit(".", 2)[0]
        on_input = config.scales_input(site, feedforward_entries)
        targets.append(site)
        if on_input:
            feedforward.append(site)
        conv1d = conv1d or isinstance(base_at(model, site), Conv1D)
        tensors[f"{PREFIX}{site}{_SUFFIX}"] = value.reshape(1, -1) if on_input else value.reshape(-1, 1)
    hf = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
          "fan_in_fan_out": conv1d, "init_ia3_weights": True, "exclude_modules": None}
    return hf, tensors


def _peft_matches(spec: Any, site: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, site) is not None
    return any(site == t or site.endswith("." + t) for t in spec or ())


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    if hf.get("exclude_modules"):
        raise ConfigError("this PEFT IA3 adapter uses exclude_modules, which peftkit does not read.")
    state, sites, feedforward = {}, [], []
    for key, value in tensors.items():
        path = key.removeprefix(PREFIX)
        if not path.endswith(_SUFFIX):
            raise ConfigError(f"unexpected tensor {key!r} in a PEFT IA3 adapter.")
        site = path.removesuffix(_SUFFIX)
        on_input = value.dim() == 2 and value.shape[0] == 1 and _peft_matches(hf.get("feedforward_modules"), site)
        sites.append(site)
        if on_input:
            feedforward.append(site)
        state[f"{site}.ia3.scale"] = value.reshape(-1)
    order = {name: i for i, (name, _) in enumerate(iter_sites(model))}
    sites.sort(key=lambda s: order.get(s, len(order)))
    config = make_config("ia3", targets=sites, feedforward=feedforward or None, trainable_modules=None)
    return config, state


IA3_CODEC = HfCodec(peft_type="IA3", to_hf=to_hf, from_hf=from_hf)
