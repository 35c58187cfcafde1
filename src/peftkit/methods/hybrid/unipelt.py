"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in one model, each behind a learned gate
where the form allows.

Paper: Mao, Mathias, Hou, Almahairi, Ma, Han, Yih & Khabsa, "UniPELT: A Unified Framework for
Parameter-Efficient Language Model Tuning", ACL 2022.
Formula: LoRA on the query/value projections ``W x + g_L(x)·s·B·A·x``; a sequential adapter after
the FFN ``h + g_A(h)·f(h)``; prefix key/values in every attention; each gate
``g = σ(W_g·z)`` per token from the part's own input (`gate.py`, init 0.5).

Built as ``compose(lora, prefix_tuning, adapter, gates=[True, False, True])``. The paper also gates
the prefix (``g_P`` scales P_K, P_V); peftkit's prefix is a model-level delta spliced into attention,
which the generic gate cannot reach, so **the prefix part runs ungated** — a documented deviation.
Defaults (the paper's BERT-base setting, check): LoRA r = 8, α = 16; prefix length 10 with an MLP
of width 512; adapter bottleneck 48 after the FFN (Pfeiffer placement). Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import MethodConfig, flag, number, size
from ...core.registry import Attachment, MethodSpec, register
from ...core.targets import LayerSpec
from . import compose


@dataclass(frozen=True)
class UniPeltConfig(MethodConfig):
    """Options of ``unipelt``; `gate` turns the learned gates of LoRA and the adapter on or off."""

    method = "unipelt"
    lora_r: int = 8
    lora_alpha: float = 16
    prefix_length: int = 10
    prefix_hidden: int = 512
    bottleneck: int = 48
    gate: bool = True
    layers: LayerSpec = None

    def problems(self):
        for name in ("lora_r", "prefix_length", "bottleneck"):
            yield from size(name, getattr(self, name))
        yield from number("lora_alpha", self.lora_alpha, "> 0", lambda a: a > 0)
        yield from size("prefix_hidden", self.prefix_hidden, 0, note=" (0: no MLP)")
        yield from flag("gate", self.gate)

    def parts(self) -> compose.ComposeConfig:
        """The composition this recipe stands for."""
        lora = {"method": "lora", "r": self.lora_r, "alpha": self.lora_alpha, "layers": self.layers}
        prefix = {"method": "prefix_tuning", "num_virtual_tokens": self.prefix_length,
                  "reparam_hidden": self.prefix_hidden, "layers": self.layers}
        adapter = {"method": "adapter", "placement": "pfeiffer", "bottleneck": self.bottleneck, "layers": self.layers}
        return compose.ComposeConfig(parts=[lora, prefix, adapter], gates=[self.gate, False, self.gate])


def build(model: nn.Module, config: UniPeltConfig) -> Attachment:
    return compose.build(model, config.parts())


register(MethodSpec(
    name="unipelt",
    family="hybrid",
    config_cls=UniPeltConfig,
    build=build,
    summary="UniPELT: gated LoRA + prefix tuning + gated bottleneck adapter (prefix ungated).",
))
