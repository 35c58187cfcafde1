"""Prompt tuning in the Hugging Face PEFT format (``peft_type: PROMPT_TUNING``): the (k, d) soft
prompt as ``prompt_embeddings``. PEFT's init names: RANDOM, SAMPLE_VOCAB, TEXT."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.registry import HfCodec
from ...core.registry import config as make_config
from .prompt_learning_hf import KEY, MODULE_PREFIX, common_fields, read_table, require_shifted, the_table

_INIT_TO_HF = {"random": "RANDOM", "vocabulary": "SAMPLE_VOCAB", "text": "TEXT"}


def to_hf(config: Any, state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    require_shifted(config, model)
    table = the_table(state, "prompt")
    hf = common_fields("PROMPT_TUNING", table, model)
    hf.update({
        "token_dim": int(table.shape[1]),
        "prompt_tuning_init": _INIT_TO_HF[config.init],
        "prompt_tuning_init_text": config.init_text,
        "tokenizer_name_or_path": config.tokenizer,
        "tokenizer_kwargs": None,
    })
    return hf, {KEY: table}


def from_hf(hf: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    table = read_table(hf, tensors)
    # The init only matters before training; a TEXT init is not replayed (it would need the tokenizer).
    init = "random" if hf.get("prompt_tuning_init") == "RANDOM" else "vocabulary"
    config = make_config("prompt_tuning", num_virtual_tokens=int(table.shape[0]), init=init, shift_positions=True, trainable_modules=None)
    return config, {"__model__.prompt.values": table}


PROMPT_CODEC = HfCodec(peft_type="PROMPT_TUNING", to_hf=to_hf, from_hf=from_hf, module_prefix=MODULE_PREFIX)
