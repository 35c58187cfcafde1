"""Prefix tuning (Li & Liang, ACL 2021).

Trainable key/value rows are put before the keys and values of the self-attention in every layer:
``attn(Q, [P_K; K], [P_V; V])``, P_K, P_V ∈ R^{l×d_kv} per layer, seen by every query (causal
masking applies to the real tokens only; padding masks are widened). While training, the rows are
reparameterised: ``P = MLP(E)``, E ∈ R^{l×d_kv} → Linear(d_kv, h) → Tanh → Linear(h, 2·L·d_kv);
only P is saved, and a loaded prefix is stored directly. On decoders real tokens take positions
l, l+1, … (``shift_positions``), as when the prefix is a pre-filled cache (the paper's GPT-2 code,
PEFT); on bidirectional encoders they keep 0, 1, … so BERT's [CLS] stays where pre-training put it
(see benchmarks/results/recipes.md for what that is worth).

Placement: the self-attention of every transformer block found by `core.arch` (BERT-style encoders
and decoders alike), through the engine's *context* form (`core/forms/context.py`); works with
padding masks, gradient checkpointing and `generate()` with its KV cache. Layout of P per virtual
token: ``[layer0 K (H_kv×hd) | layer0 V | layer1 K | …]``, PEFT's ``prompt_embeddings`` layout.
Init: E ~ N(0, 1) (PEFT's), MLP default init. Defaults: l = 10, h = 512. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import arch
from ...core.config import SiteConfig, check, flag, size
from ...core.forms.context import KeyValuePrefix
from ...core.forms.input import shifts_positions
from ...core.forms.table import LearnedTable
from ...core.linear import device_of
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import parse_layers
from ...errors import ConfigError
from .prefix_tuning_hf import PREFIX_CODEC


@dataclass(frozen=True)
class PrefixTuningConfig(SiteConfig):
    """Options of ``prefix_tuning``. `reparam_hidden=0` trains the prefix directly (no MLP);
    `num_kv_heads` / `head_dim` override what is read from the model config. `targets` and
    `exclude` are not used (the prefix goes to every self-attention); `layers` keeps only some."""

    method = "prefix_tuning"
    num_virtual_tokens: int = 10
    reparam_hidden: int = 512
    shift_positions: bool | None = None  # None: True on decoders (causal attention), False on encoders
    num_kv_heads: int | None = None
    head_dim: int | None = None

    def problems(self):
        yield from size("num_virtual_tokens", self.num_virtual_tokens)
        yield from size("reparam_hidden", self.reparam_hidden, 0, note=" (0: no MLP)")
        yield from flag("shift_positions", self.shift_positions, optional=True)
        yield from size("num_kv_heads", self.num_kv_heads, optional=True)
        yield from size("head_dim", self.head_dim, optional=True)
        yield from check((self.num_kv_heads is None) == (self.head_dim is None),
                         "give num_kv_heads and head_dim together")
        yield from check(self.targets is None and self.exclude is None,
                         f"targets / exclude must be unset (got {self.targets!r} / {self.exclude!r}): prefix_tuning "
                         "attaches to every self-attention; use layers=... to choose some")


def _prefix_mlp(dim: int, hidden: int, out: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden, dtype=dtype, device=device), nn.Tanh(),
                         nn.Linear(hidden, out, dtype=dtype, device=device))


def build(model: nn.Module, config: PrefixTuningConfig) -> Attachment:
    roles = arch.blocks(model)
    names = [r.block for r in roles]
    wanted = parse_layers(config.layers, len(names))
    if wanted is not None:
        names = [n for i, n in enumerate(names) if i in wanted]
    if not names:
        raise ConfigError(f"layers={config.layers!r} keeps none of the model's {len(roles)} blocks.")
    if config.num_kv_heads is not None:
        kv_heads, head_dim = config.num_kv_heads, config.head_dim
    else:
        kv_heads, head_dim = arch.attention_geometry(model)
    dim, n = kv_heads * head_dim, config.num_virtual_tokens
    kw: dict[str, Any] = {"dtype": torch.float32, "device": device_of(model)}
    if config.reparam_hidden:
        mlp = _prefix_mlp(dim, config.reparam_hidden, 2 * len(names) * dim, **kw)
        table = LearnedTable(torch.randn(n, dim, **kw), mlp)
    else:
        table = LearnedTable(torch.randn(n, 2 * len(names) * dim, **kw))
    shift = shifts_positions(model, config.shift_positions)
    return Attachment(model_deltas={"prefix": KeyValuePrefix(table, names, kv_heads, head_dim, shift)})


register(MethodSpec(
    name="prefix_tuning",
    family="additive",
    config_cls=PrefixTuningConfig,
    build=build,
    summary="Trainable key/value rows before every self-attention (MLP-reparameterised while training).",
    hf=PREFIX_CODEC,
    # The prefix trains at the task's rate (its MLP collapses at higher ones); a new task head under a
    # prefix sees features that barely move at first, and at that rate stays at the majority class.
    recipe={"head_lr": 1e-2},
))
