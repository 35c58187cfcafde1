"""``ln_tuning`` in the Hugging Face PEFT on-disk format (``peft_type: LN_TUNING``).

PEFT stores each tuned norm as a full copy under ``base_model.model.<site>.ln_tuning_layers.<param>``
— the same tensors peftkit keeps, so only the names change and round trips are exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.registry import HfCodec
from ...core.registry import config as make_config
from ...errors import ConfigError

PREFIX = "base_model.model."
MARK = ".ln_tuning_layers."
SLOT_MARK = ".ln.values."


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors, sites = {}, []
    for key, value in state.items():
        site, param = key.split(SLOT_MARK)
        if site not in sites:
            sites.append(site)
        tensors[f"{PREFIX}{site}{MARK}{param.replace('__', '.')}"] = value
    return {"peft_type": "LN_TUNING", "target_modules": sites, "exclude_modules": None}, tensors


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    state, sites = {}, []
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or MARK not in key:
            raise ConfigError(f"unexpected tensor {key!r} in an LN_TUNING adapter")
        site, param = key[len(PREFIX):].split(MARK)
        if site not in sites:
            sites.append(site)
        state[f"{site}{SLOT_MARK}{param.replace('.', '__')}"] = value
    if not sites:
        raise ConfigError("the LN_TUNING adapter holds no tuned norm layer")
    return make_config("ln_tuning", targets=sites), state


LN_TUNING_CODEC = HfCodec(peft_type="LN_TUNING", to_hf=to_hf, from_hf=from_hf)
