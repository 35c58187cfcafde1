"""QLoRA: LoRA on every linear layer of a frozen, 4-bit NormalFloat base (a recipe, no new layer code).

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023). The base's linear
weights are stored as NF4 (the 16 normal-quantile values of `peftkit.quant.codes`) in blocks of
64 with their absmax double-quantized (8 bit, blocks of 256): 0.516 bytes per weight. Deltas are
plain LoRA in 16/32-bit: ``y = deq(W_nf4)·x + b + (α/r)·B·A·x``; the weight is dequantized on the
fly in forward and backward, never trained.

Placement: LoRA on all linear layers except the output and task heads (``targets="all-linear"``);
the whole base is quantized whatever `targets` says. Init and LoRA options as ``lora``.
Defaults: r=8, alpha=16, dropout=0; nf4, double_quant=True, blocksize=64, compute in the input dtype.

How the base gets quantized: the method's ``prepare`` step, which ``peftkit.attach`` (and so
``peftkit.load`` and ``--method qlora``) runs before ``build``; ``build`` itself never changes
the model. Layers that are already quantized are left as they are, so ``peftkit.quantize(model,
...)`` or ``peftkit.quant.load_quantized(...)`` beforehand works too, and keeps peak memory lower:
until ``attach`` returns, the full-precision layers it replaced stay in memory, so that a failed
attach can put them back.
Saved adapters are LoRA adapters plus these options; in the Hugging Face PEFT format a qlora
adapter is a ``LORA`` adapter (PEFT keeps quantization in the model, not the adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...core import registry
from ...core.config import MethodConfig, flag, one_of
from ...core.linear import is_quantized
from ...core.registry import Attachment, HfCodec, MethodSpec, register
from ...core.targets import Spec, base_at
from ...errors import ConfigError
from ...quant.apply import quantize_revertibly
from ...quant.spec import BACKENDS, BLOCKSIZES, SCHEMES, parse_dtype
from .lora import LoraConfig

_QUANT_FIELDS = ("quant_type", "double_quant", "blocksize", "compute_dtype", "backend")


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """``lora`` options plus how the base is quantized."""

    method = "qlora"
    targets: Spec = "all-linear"
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str | None = None
    backend: str = "torch"

    def problems(self):
        yield from super().problems()
        yield from one_of("quant_type", self.quant_type, SCHEMES)
        yield from flag("double_quant", self.double_quant)
        yield from one_of("blocksize", self.blocksize, BLOCKSIZES)
        yield from one_of("backend", self.backend, BACKENDS)
        try:
            parse_dtype(self.compute_dtype)
        except ConfigError as err:
            yield str(err).rstrip(".")

    def quantization(self) -> dict[str, Any]:
        """Keyword arguments of `peftkit.quantize` for this recipe's base."""
        return {"scheme": self.quant_type, "double_quant": self.double_quant, "blocksize": self.blocksize,
                "compute_dtype": self.compute_dtype, "backend": self.backend}

    def as_lora(self) -> MethodConfig:
        options = {k: v for k, v in self.to_dict().items() if k not in _QUANT_FIELDS}
        return registry.config("lora", **options)


def prepare(model: nn.Module, config: QLoraConfig) -> Callable[[], None]:
    # layers quantized already are left as they are; a failed attach puts the full-precision ones back
    return quantize_revertibly(model, **config.quantization())


def build(model: nn.Module, config: QLoraConfig) -> Attachment:
    attachment = registry.get("lora").build(model, config.as_lora())
    plain = [s for s in attachment.sites if not is_quantized(base_at(model, s))]
    if len(plain) == len(attachment.sites):
        raise ConfigError("qlora needs a quantized base, and none of its target layers is quantized. "
                          "peftkit.attach() quantizes the base itself; when building parts directly (e.g. inside "
                          f"compose), quantize first: peftkit.quantize(model, {config.quant_type!r}).")
    return attachment


def _to_hf(config: QLoraConfig, state: Any, model: nn.Module) -> Any:
    return registry.get("lora").hf.to_hf(config.as_lora(), state, model)


def _from_hf(hf: dict[str, Any], tensors: Any, model: nn.Module) -> Any:
    return registry.get("lora").hf.from_hf(hf, tensors, model)


register(MethodSpec(
    name="qlora",
    family="reparameterized",
    config_cls=QLoraConfig,
    build=build,
    prepare=prepare,
    summary="LoRA on all linear layers of an NF4 (double-quantized) base; the base is quantized on attach.",
    hf=HfCodec(peft_type="LORA", to_hf=_to_hf, from_hf=_from_hf),
    identity_at_init=True,  # relative to the quantized base
))
