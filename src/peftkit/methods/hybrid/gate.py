"""A learned gate around any delta whose change is additive in form (UniPELT's gating, made generic).

Gate: ``g = σ(w·ẑ/√d + b)`` per token, one scalar, z ∈ R^d the features the delta reads and
ẑ = z / rms(z) (Mao et al., "UniPELT", ACL 2022 gate each part by a sigmoid of a linear map of its
input). The parameter-free normalisation and the 1/√d keep the logit's step under Adam near lr
whatever the scale and width of z — with a raw ``w·z`` a gate on wide, large hidden states
saturates and flips within a few steps at lr 1e-3 (a UniPELT run on MiniLM collapsed to the
majority class that way). Init w = 0, b = 0, so every gate starts at exactly 0.5.

What can be gated, by the hook the delta fills in:

- ``contribution`` (reparam / parallel: LoRA, parallel adapters): ``y + g(x)·Δ(x)``, z = the site's
  input (its output for embedding sites, whose input is token ids);
- ``transform_output`` (sequential / scale: bottleneck adapters, (IA)³ on outputs):
  ``y + g(y)·(T(y) − y)`` — for a residual adapter ``T(y) = y + f(y)`` this is ``y + g·f(y)``;
- ``transform_input`` (scale on the input): ``x + g(x)·(T(x) − x)``.

Not gateable: the *select* form (``param_overrides``: a parameter cannot take a per-token value)
and model-level deltas (*input* / *context* forms: virtual tokens and prefixes are spliced in
before any site sees a token). A gated delta is never mergeable (the gate depends on the input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.linear import delta_dtype, device_of, is_linear, linear_dims
from ...core.protocol import Delta
from ...errors import ConfigError

GATEABLE = frozenset({"contribution", "transform_output", "transform_input"})


def feature_dims(base: nn.Module, model: nn.Module) -> tuple[int | None, int | None]:
    """(input features, output features) of a site, from its layer type or the model's hidden size."""
    if is_linear(base):
        return linear_dims(base)
    if isinstance(base, nn.Embedding):
        return None, base.embedding_dim
    shape = getattr(base, "normalized_shape", None)
    if shape:
        return shape[-1], shape[-1]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return hidden, hidden


class GatedDelta(Delta):
    """``inner`` behind a learned per-token gate; hooks and form are the inner delta's."""

    mergeable = False

    def __init__(self, inner: Delta, base: nn.Module, model: nn.Module, where: str = "") -> None:
        super().__init__()
        if not inner.hooks or not inner.hooks <= GATEABLE:
            raise ConfigError(f"{type(inner).__name__}{where} ({inner.form} form, hooks {sorted(inner.hooks)}) cannot "
                              "be gated: only additive contributions and input/output transforms can. "
                              "Set this part's gate to false.")
        self.inner = inner
        self.hooks = inner.hooks  # per instance: the host runs exactly the inner delta's hooks
        self.form = f"{inner.form}+gate"
        in_dim, out_dim = feature_dims(base, model)
        from_input = in_dim is not None and not isinstance(base, nn.Embedding)
        self.contribution_from_input = from_input
        dims = {"contribution": in_dim if from_input else out_dim, "transform_output": out_dim,
                "transform_input": in_dim}
        kw = {"dtype": delta_dtype(base), "device": device_of(base)}
        self.gates = nn.ModuleDict()
        for hook in sorted(inner.hooks):
            if dims[hook] is None:
                raise ConfigError(f"cannot size a gate for the {hook} of {type(inner).__name__}{where}: the site "
                                  f"{type(base).__name__} has no known feature size.")
            gate = nn.Linear(dims[hook], 1, **kw)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            self.gates[hook] = gate

    def gate(self, hook: str, z: torch.Tensor) -> torch.Tensor:
        """σ(w·ẑ/√d + b), ẑ = z/rms(z): shape (..., 1), in z's dtype."""
        layer = self.gates[hook]
        features = z.to(layer.weight.dtype)
        features = features * torch.rsqrt(features.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        logit = F.linear(features, layer.weight) / math.sqrt(features.shape[-1]) + layer.bias
        return torch.sigmoid(logit).to(z.dtype)

    def contribution(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        change = self.inner.contribution(x, base, base_out)
        z = x if self.contribution_from_input else base_out
        return self.gate("contribution", z).to(change.dtype) * change

    def transform_output(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.gate("transform_output", y) * (self.inner.transform_output(y) - y)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate("transform_input", x) * (self.inner.transform_input(x) - x)

    # -- protocol: the inner delta's tensors under "inner.", the gates under "gates." ----------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.inner.trainable_parameters()
        yield from self.gates.parameters()

    def export_state(self) -> dict[str, torch.Tensor]:
        state = {f"inner.{k}": v for k, v in self.inner.export_state().items()}
        state.update({f"gates.{k}": v.detach() for k, v in self.gates.state_dict().items()})
        return state

    def _split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        inner = {k[6:]: v for k, v in state.items() if k.startswith("inner.")}
        gates = {k[6:]: v for k, v in state.items() if k.startswith("gates.")}
        return inner, gates

    def state_shapes(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        inner, _ = self._split(state)
        shapes = {f"inner.{k}": s for k, s in self.inner.state_shapes(inner).items()}
        shapes.update({f"gates.{k}": tuple(v.shape) for k, v in self.gates.state_dict().items()})
        return shapes

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        inner, gates = self._split(state)
        self.inner.import_state(inner)
        self.gates.load_state_dict(gates, strict=True)

    def regularizer(self) -> torch.Tensor | None:
        return self.inner.regularizer()
