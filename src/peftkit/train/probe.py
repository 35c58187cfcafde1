"""Linear-probe start for a new task head (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution", ICLR 2022).

A randomly initialised classifier sends random gradients into whatever sits under it until it has
learned something, and Adam grows its weights by at most about the learning rate per step. Methods
that move the features only a little (soft prompts) spend a short budget on a head that is still
finding its scale. Fitting the head first, by logistic regression on the features of the attached
but untrained model, starts training from the frozen-backbone optimum instead.

The head's *last* linear layer is fitted (a BERT ``classifier``, a RoBERTa ``classifier.out_proj``)
on the inputs it receives for a sample of training examples (dropout off), standardised, by L-BFGS
with a small L2 penalty; the standardisation is folded back into the weights. Heads whose last linear
layer sees per-token inputs (decoder classifiers pool *after* it) are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.protocol import COPY_SLOT
from ..core.targets import base_at, head_names
from .batches import collate
from .fsdp import assign

# A sample is enough: fitting on a whole split gave no better head (benchmarks/results/recipes.md)
PROBE_EXAMPLES = 4096
WEIGHT_DECAY = 1e-3  # on standardised features, summed over the weights (as benchmarks/accuracy.py)


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` registered in `module` (itself included) and its path inside it."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def head_site(model: nn.Module) -> str | None:
    """The task-head module that produces the logits (DistilBERT: ``classifier``, after ``pre_classifier``)."""
    sites = head_names(model)
    return sites[-1] if sites else None


def _head_copy(tuned: Any, adapter: str) -> tuple[Any, str, nn.Linear] | None:
    """(the adapter's trainable copy of the head, the fitted layer's key prefix in it, that layer)."""
    site = head_site(tuned.model)
    if site is None:
        return None
    copy = dict(tuned.deltas(adapter)).get(f"{site}.{COPY_SLOT}")
    found = last_linear(base_at(tuned.model, site))
    if copy is None or found is None:
        return None
    path, layer = found
    return copy, (path.replace(".", "__") + "__") if path else "", layer


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int,
                 weight_decay: float = WEIGHT_DECAY) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a multinomial logistic regression of `y` on `x` (raw feature scale)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    linear = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(z), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight = linear.weight.detach() / std
    return weight, linear.bias.detach() - weight @ mean


@torch.no_grad()
def probe_head(tuned: Any, prepared: Any, pad_id: int, device: torch.device | str, seed: int,
               adapter: str = "default", examples: int = PROBE_EXAMPLES) -> str:
    """Fit adapter `adapter`'s new head on the current features; returns what was done, for the log."""
    found = _head_copy(tuned, adapter)
    if found is None:
        return "no task head to probe"
    copy, prefix, layer = found
    enc = prepared.train
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(enc), generator=generator)[:examples].tolist()
    sample.sort(key=lambda i: int(enc.offsets[i + 1] - enc.offsets[i]))
    inputs: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().float().cpu()))
    was_training = tuned.training
    tuned.eval()
    labels = []
    try:
        for start in range(0, len(sample), 64):
            batch = collate(enc, sample[start:start + 64], pad_id)
            labels.append(batch.pop("labels"))
            tuned(**{k: v.to(device) for k, v in batch.items()})
    finally:
        hook.remove()
        tuned.train(was_training)
    x = torch.cat(inputs)
    if x.dim() != 2 or x.shape[0] != len(sample):
        return f"head not probed: its last linear layer sees per-token inputs {tuple(x.shape)}"
    y = torch.cat(labels)
    weight, bias = fit_logistic(x, y, layer.out_features)
    values = copy.values
    assign(values[prefix + "weight"], weight)
    if layer.bias is not None:
        assign(values[prefix + "bias"], bias)
    fitted = (x @ weight.T + bias).argmax(1).eq(y).float().mean().item()
    return f"head fitted on {len(sample)} training examples' features (training accuracy {fitted:.4f})"
