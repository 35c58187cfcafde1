"""P-tuning (Liu et al., "GPT Understands, Too", 2021).

Like prompt tuning, k virtual tokens go before the input embeddings, but they are produced by a
prompt encoder over learned inputs while training: ``P = enc(E)``, E ∈ R^{k×d}, with
``encoder="mlp"``: Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d), or ``"lstm"``: a
2-layer bidirectional LSTM (hidden h) → Linear(2h, 2h) → ReLU → Linear(2h, d) (PEFT's encoders).
Only P is saved; a loaded P is stored directly. Masks, labels and `generate()` as in
`core/forms/input.py`.

Placement: the model's input embeddings. Init: E ~ N(0, 1), encoder default init (PEFT's).
Defaults: k = 20, encoder = mlp, h = d. Not mergeable.
Training recipe (`peftkit methods`): the encoder at 1e-3, a new task head at 1e-2, the frozen base's
dropout off and the head fitted before training (`peftkit.train.recipes` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import MethodConfig, flag, one_of, size
from ...core.forms.input import VirtualTokens, input_embeddings
from ...core.forms.table import LearnedTable
from ...core.registry import Attachment, MethodSpec, register
from .p_tuning_hf import P_TUNING_CODEC

ENCODERS = ("mlp", "lstm")


@dataclass(frozen=True)
class PTuningConfig(MethodConfig):
    """Options of ``p_tuning``; `encoder_hidden` defaults to the embedding size."""

    method = "p_tuning"
    num_virtual_tokens: int = 20
    shift_positions: bool | None = None  # None: True on decoders, False on encoders (core/forms/input.py)
    encoder: str = "mlp"
    encoder_hidden: int | None = None

    def problems(self):
        yield from size("num_virtual_tokens", self.num_virtual_tokens)
        yield from flag("shift_positions", self.shift_positions, optional=True)
        yield from one_of("encoder", self.encoder, ENCODERS)
        yield from size("encoder_hidden", self.encoder_hidden, optional=True)


class LstmEncoder(nn.Module):
    """(k, d) → bidirectional LSTM → MLP head → (k, d)."""

    def __init__(self, dim: int, hidden: int, **kw: Any) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(), nn.Linear(2 * hidden, dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(0))  # (1, k, 2h)
        return self.head(out.squeeze(0))


def prompt_encoder(kind: str, dim: int, hidden: int, **kw: Any) -> nn.Module:
    if kind == "lstm":
        return LstmEncoder(dim, hidden, **kw)
    return nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                         nn.Linear(hidden, dim, **kw))


def build(model: nn.Module, config: PTuningConfig) -> Attachment:
    weight = input_embeddings(model).weight
    dim = weight.shape[1]
    kw: dict[str, Any] = {"dtype": torch.float32, "device": weight.device}
    encoder = prompt_encoder(config.encoder, dim, config.encoder_hidden or dim, **kw)
    table = LearnedTable(torch.randn(config.num_virtual_tokens, dim, **kw), encoder)
    return Attachment(model_deltas={"prompt": VirtualTokens.for_model(model, table, config.shift_positions)})


register(MethodSpec(
    name="p_tuning",
    family="additive",
    config_cls=PTuningConfig,
    build=build,
    summary="Virtual tokens produced by a trainable prompt encoder (MLP or LSTM); only the tokens are saved.",
    hf=P_TUNING_CODEC,
    # The encoder at 1e-3: higher rates make the result depend more on the seed and lower it on average;
    # a new task head at 1e-2. As prompt tuning: the base's dropout off and a new head fitted first.
    recipe={"lr": 1e-3, "head_lr": 1e-2, "base_dropout": 0.0, "probe_head": True},
))
