"""What PEFT's prompt-learning formats (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) share.

Their files hold one tensor, ``prompt_embeddings``: the final virtual-token table (the encoder
output, never the encoder), plus ``base_model.<module>`` copies of trained modules. The config
records the model's geometry (``num_layers``, ``token_dim``, ``num_attention_heads``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.forms.input import shifts_positions
from ...errors import ConfigError

KEY = "prompt_embeddings"
MODULE_PREFIX = "base_model."


def require_shifted(config: Any, model: nn.Module) -> None:
    """PEFT always puts the real tokens after the virtual ones / the prefix; refuse what it cannot express."""
    if not shifts_positions(model, config.shift_positions):
        raise ConfigError(f"PEFT always starts the real tokens after the {config.method} tokens, but this adapter keeps "
                          "their own positions (shift_positions=False; None means False on bidirectional encoders such "
                          "as BERT). Save it with format='peftkit', or train it with shift_positions=True for a PEFT file.")


def model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def common_fields(peft_type: str, table: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    config = model_config(model)
    return {
        "peft_type": peft_type,
        "num_virtual_tokens": int(table.shape[0]),
        "num_transformer_submodules": 1,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "token_dim": getattr(config, "hidden_size", None),
        "num_attention_heads": getattr(config, "num_attention_heads", None),
    }


def the_table(state: dict[str, torch.Tensor], slot: str) -> torch.Tensor:
    """The one peftkit tensor of a prompt-learning adapter (``__model__.<slot>.values``)."""
    tables = [v for k, v in state.items() if k.endswith(f"{slot}.values")]
    if len(tables) != 1:
        raise ConfigError(f"expected one virtual-token table in the adapter, found keys {sorted(state)}")
    return tables[0]


def read_table(hf: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``prompt_embeddings`` from a PEFT file, checked against the config."""
    if KEY not in tensors:
        raise ConfigError(f"a PEFT {hf.get('peft_type')} adapter must hold {KEY!r}; found {sorted(tensors)[:5]}")
    extra = sorted(k for k in tensors if k != KEY)
    if extra:
        raise ConfigError(f"unexpected tensors {extra[:3]} in a PEFT {hf.get('peft_type')} adapter")
    if int(hf.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("encoder-decoder prompt adapters (num_transformer_submodules=2) are not supported")
    table = tensors[KEY]
    if table.dim() != 2 or table.shape[0] != int(hf.get("num_virtual_tokens", table.shape[0])):
        raise ConfigError(f"{KEY} has shape {tuple(table.shape)}, which does not fit num_virtual_tokens="
                          f"{hf.get('num_virtual_tokens')}")
    return table
