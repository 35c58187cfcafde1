"""P-tuning in the Hugging Face PEFT format (``peft_type: P_TUNING``): the encoder's output
(k, d) as ``prompt_embeddings``; the encoder itself is not stored (as in PEFT)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.registry import HfCodec
from ...core.registry import config as make_config
from .prompt_learning_hf import KEY, MODULE_PREFIX, common_fields, read_table, require_shifted, the_table


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    require_shifted(config, model)
    table = the_table(state, "prompt")
    hf = common_fields("P_TUNING", table, model)
    hf.update({
        "token_dim": int(table.shape[1]),
        "encoder_reparameterization_type": config.encoder.upper(),
        "encoder_hidden_size": config.encoder_hidden or int(table.shape[1]),
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
    })
    return hf, {KEY: table}


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    table = read_table(hf, tensors)
    encoder = str(hf.get("encoder_reparameterization_type") or "MLP").lower()
    config = make_config("p_tuning", num_virtual_tokens=int(table.shape[0]),
                         encoder=encoder if encoder in ("mlp", "lstm") else "mlp",
                         encoder_hidden=hf.get("encoder_hidden_size"), shift_positions=True, trainable_modules=None)
    return config, {"__model__.prompt.values": table}


P_TUNING_CODEC = HfCodec(peft_type="P_TUNING", to_hf=to_hf, from_hf=from_hf, module_prefix=MODULE_PREFIX)
