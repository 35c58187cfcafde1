"""Prefix tuning in the Hugging Face PEFT format (``peft_type: PREFIX_TUNING``).

peftkit keeps the prefix in PEFT's ``prompt_embeddings`` layout, (l, 2·L·H_kv·hd), so only names
and config fields change. PEFT records the key/value geometry as ``num_attention_heads`` = key/value
heads and ``token_dim`` = H_kv·hd (its GQA rewrite). Only the final prefix is stored (the
reparameterisation MLP is never saved); a loaded prefix trains directly if made trainable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import arch
from ...core.registry import HfCodec
from ...core.registry import config as make_config
from ...errors import ConfigError
from .prompt_learning_hf import KEY, MODULE_PREFIX, common_fields, read_table, require_shifted, the_table


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    table = the_table(state, "prefix")
    blocks = len(arch.blocks(model))
    kv_heads, head_dim = (config.num_kv_heads, config.head_dim) if config.num_kv_heads else arch.attention_geometry(model)
    if table.shape[1] != 2 * blocks * kv_heads * head_dim:
        raise ConfigError("a prefix on a subset of layers has no PEFT equivalent (PEFT prefixes every layer); "
                          "save it with format='peftkit'.")
    require_shifted(config, model)
    hf = common_fields("PREFIX_TUNING", table, model)
    hf.update({
        "num_layers": blocks,
        "num_attention_heads": kv_heads,
        "token_dim": kv_heads * head_dim,
        "encoder_hidden_size": config.reparam_hidden or kv_heads * head_dim,
        "prefix_projection": bool(config.reparam_hidden),
        "init_weights": None,
    })
    return hf, {KEY: table}


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    table = read_table(hf, tensors)
    blocks = len(arch.blocks(model))
    if int(hf.get("num_layers", blocks)) != blocks:
        raise ConfigError(f"the prefix was made for {hf.get('num_layers')} layers but the model has {blocks}")
    heads, dim = int(hf["num_attention_heads"]), int(hf["token_dim"])
    geometry = {} if (heads, dim // heads) == arch.attention_geometry(model) else {
        "num_kv_heads": heads, "head_dim": dim // heads}
    config = make_config("prefix_tuning", num_virtual_tokens=int(table.shape[0]), reparam_hidden=0,
                         shift_positions=True, trainable_modules=None, **geometry)
    return config, {"__model__.prefix.values": table}


PREFIX_CODEC = HfCodec(peft_type="PREFIX_TUNING", to_hf=to_hf, from_hf=from_hf, module_prefix=MODULE_PREFIX)
