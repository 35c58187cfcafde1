"""The causal-LM loss without the full logits: cross-entropy over a large vocabulary, chunk by chunk.

A small LM's largest tensors in training are its logits: (tokens × vocabulary) in float32, kept for
backward, plus their softmax gradient (SmolLM2-135M, 49,152 words: 200 MB for a batch of 4 × 256).
Here the model stops at its last hidden states (the output projection is skipped), and the loss
``mean over labelled positions of logsumexp(h·Wᵀ + b) − (h·Wᵀ + b)[label]`` is computed on chunks of the
labelled rows only (prompts and padding, which take no loss, are never projected). The loss is a scalar, so
its gradients are known in forward: each chunk's softmax, made in place of its logits, gives its rows'
gradient for h (and for W and b when they train) at once, and backward only scales them. What is kept: the
gradient for h (tokens × hidden, float32), no logits, and nothing is recomputed. The same loss and gradients
as transformers' causal-LM loss (the labels shifted by one, −100 ignored, the softmax in float32; under
autocast the products in autocast's dtype, as there), to float rounding.

`VocabLoss.probe` decides per model: it compares the model's own logits with ``h·Wᵀ + b`` on a few
tokens, so models that change their logits after the projection (soft-capping, scaling) keep the
model's own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.linear import compute_dtype

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24  # logits computed at once: 64 MiB in float32


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, in the same pass over each chunk's logits, the gradients for the
    inputs that need one (the loss is a scalar: backward only scales them). Backward never recomputes
    the logits. The products run in `dtype` (autocast's, or float32), the softmax in float32, as
    transformers' loss under autocast does; gradients accumulate in float32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, rows: int, grad_enabled: bool, dtype: torch.dtype) -> torch.Tensor:
        # needs_input_grad does not know that the caller runs under no_grad (an evaluation): it is told
        want_hidden, want_weight, want_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):  # in-place and out= products take no autocast
            labelled = (labels != IGNORE).nonzero().squeeze(1)  # only these rows take a loss: the rest are never projected
            w = weight.to(dtype)
            b = None if bias is None else bias.to(torch.float32)
            f32 = {"dtype": torch.float32, "device": hidden.device}
            grad_hidden = torch.zeros(hidden.shape, **f32) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, **f32) if want_weight else None
            grad_bias = torch.zeros(bias.shape, **f32) if want_bias else None
            total = torch.zeros((), **f32)
            for start in range(0, len(labelled), rows):
                index = labelled[start:start + rows]
                h, y = hidden.index_select(0, index).to(dtype), labels.index_select(0, index)
                logits = F.linear(h, w).to(torch.float32)  # (rows, V)
                if b is not None:
                    logits += b
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # (rows, V): d (summed loss) / d logits
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
                probs = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, index, (probs @ w).to(torch.float32))
                if grad_weight is not None:
                    grad_weight += probs.T @ h
            count = torch.tensor(max(len(labelled), 1), **f32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, count)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *grads, count = ctx.saved_tensors
        scale = (grad / count).to(torch.float32)
        return (*(None if g is None else (g * scale).to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)),
                None, None, None, None)


def causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Transformers' causal-LM loss from the last hidden states (B, T, D) and the output projection
    `head` (an ``nn.Linear``): position t predicts label t + 1, −100 ignored, mean over the rest."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1).to(hidden.device)
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, labels, rows, torch.is_grad_enabled(),
                                      compute_dtype(hidden.device, torch.float32))


class VocabLoss:
    """Runs a causal LM up to its last hidden states and takes the chunked loss there."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", model)  # a TunedModel's transformers model
        getter = getattr(inner, "get_output_embeddings", None)
        self.head = getter() if callable(getter) else None

    @property
    def usable(self) -> bool:
        return isinstance(self.head, nn.Linear)

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[list[torch.Tensor]]:
        """Inside, the model's ``logits`` output holds the hidden states the head would have projected;
        the list yielded receives them as the head saw them (virtual-token positions included). The head
        itself does not run: its forward is the identity for the length of the block (a forward hook
        would only replace the logits after they were made, a (tokens × vocabulary) product, and with
        ``logits_to_keep`` the model hands the head a strided slice that matmul multiplies through a copy
        of the weight per sequence)."""
        seen: list[torch.Tensor] = []
        head = self.head
        own = head.__dict__.get("forward")  # an instance-level forward someone else set, put back after

        def passthrough(hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
            seen.append(hidden)
            return hidden

        head.forward = passthrough
        try:
            yield seen
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own

    @torch.no_grad()
    def probe(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the model's logits are exactly ``head(hidden)`` on a slice of `batch` (so that the
        chunked loss is the model's own); False for models that post-process their logits."""
        if not self.usable:
            return False
        inputs = {k: v[:1, :16] for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
        was_training = model.training
        model.eval()
        try:
            logits = model(**inputs).logits
            with self.hidden_states():
                hidden = model(**inputs).logits
        finally:
            model.train(was_training)
        return logits.shape == hidden.shape[:-1] + (self.head.out_features,) and torch.allclose(
            logits.float(), self.head(hidden).float(), atol=1e-4, rtol=1e-4)

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """(the model's outputs, with ``logits`` holding hidden states; the causal-LM loss)."""
        labels = inputs["labels"]
        with self.hidden_states() as seen:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        hidden = seen[-1]
        extra = hidden.shape[1] - labels.shape[1]  # virtual tokens before the text predict its first token too
        if extra > 0:
            labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE), labels], dim=1)
        return outputs, causal_lm_loss(hidden, self.head, labels)
