"""Prompt tuning (Lester et al., EMNLP 2021).

k trainable embeddings ("soft prompt") are put before the input embeddings:
``model([P; E(x)])``, P ∈ R^{k×d}; the attention mask, token-type ids, position ids and token-level
labels are extended (labels −100 on the prompt), outputs are cut back to the real tokens, and
`generate()` injects the prompt in the prefill step only (the engine's *input* form, `core/forms/input.py`).

Placement: the model's input embeddings (``get_input_embeddings()``), any architecture.
Init: ``"vocabulary"`` (embeddings of k random vocabulary tokens, the default), ``"random"``
(N(0, σ²) with σ the std of the embedding table) or ``"text"`` (the embeddings of `init_text`
tokenised with `tokenizer`, repeated to length k; needs that tokenizer whenever the adapter is
built, also when loading). Defaults: k = 20. Not mergeable. Expect it weak on small models.
Training recipe (`peftkit methods`): learning rate 3e-2, the frozen base's dropout off and a new task
head fitted before training (`peftkit.train.recipes` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import MethodConfig, check, flag, one_of, size, text
from ...core.forms.input import VirtualTokens, input_embeddings
from ...core.forms.table import LearnedTable
from ...core.registry import Attachment, MethodSpec, register
from ...errors import ConfigError
from .prompt_tuning_hf import PROMPT_CODEC

INITS = ("vocabulary", "random", "text")


@dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Options of ``prompt_tuning``; `tokenizer` defaults to the model's ``name_or_path``."""

    method = "prompt_tuning"
    num_virtual_tokens: int = 20
    # True: real tokens after the prompt on every model, as PEFT (unsettled on encoders, see
    # benchmarks/results/recipes.md); None: unshifted on encoders (core/forms/input.py)
    shift_positions: bool | None = True
    init: str = "vocabulary"
    init_text: str | None = None
    tokenizer: str | None = None

    def problems(self):
        yield from size("num_virtual_tokens", self.num_virtual_tokens)
        yield from flag("shift_positions", self.shift_positions, optional=True)
        yield from one_of("init", self.init, INITS)
        yield from text("init_text", self.init_text, optional=True)
        yield from text("tokenizer", self.tokenizer, "a tokenizer name or folder", optional=True)
        yield from check(self.init != "text" or bool(self.init_text), "init='text' needs init_text='...'")


def _text_ids(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    path = config.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("init='text' needs a tokenizer: set tokenizer='<name or path>'.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load tokenizer {path!r} for init='text' ({err}); set tokenizer=...") from None
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} tokenises to nothing.")
    return torch.tensor(ids)


@torch.no_grad()
def initial_prompt(model: nn.Module, config: PromptTuningConfig, k: int) -> torch.Tensor:
    embed = input_embeddings(model)
    weight = embed.weight
    if config.init == "random":
        return torch.randn(k, weight.shape[1], device=weight.device) * weight.float().std()
    if config.init == "text":
        ids = _text_ids(model, config)
        ids = ids.repeat(k // len(ids) + 1)[:k]  # truncated or repeated cyclically, as in PEFT
    else:
        ids = torch.randint(0, weight.shape[0], (k,))
    return embed(ids.to(weight.device)).float()


def build(model: nn.Module, config: PromptTuningConfig) -> Attachment:
    table = LearnedTable(initial_prompt(model, config, config.num_virtual_tokens))
    return Attachment(model_deltas={"prompt": VirtualTokens.for_model(model, table, config.shift_positions)})


register(MethodSpec(
    name="prompt_tuning",
    family="additive",
    config_cls=PromptTuningConfig,
    build=build,
    summary="Trainable virtual-token embeddings before the input embeddings (soft prompt).",
    hf=PROMPT_CODEC,
    # The paper trains the prompt at 0.3 with Adafactor; 3e-2 is the AdamW equivalent, the task head at it
    # too. Soft prompts also turn the frozen base's dropout off and fit a new head first (recipes.py says why).
    recipe={"lr": 3e-2, "base_dropout": 0.0, "probe_head": True},
))
