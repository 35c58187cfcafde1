"""Logits only where the answer-only loss needs them: same loss and gradients as the full logits."""

from __future__ import annotations

import pytest
import torch
from models import tiny_gpt2, tiny_llama

import peftkit
from peftkit.train.batches import answer_logits_only, takes_logits_to_keep
from peftkit.train.data import IGNORE


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE)
    labels[0, 7:] = ids[0, 7:]   # the answers start at different columns
    labels[1, 5:9] = ids[1, 5:9]
    labels[2, 8:11] = ids[2, 8:11]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_same_loss_and_gradients(build, method) -> None:
    tuned = peftkit.attach(build(), peftkit.config(method))
    assert takes_logits_to_keep(tuned.model)
    batch = _batch()
    trimmed = answer_logits_only(batch)
    assert trimmed["logits_to_keep"] == 12 - 4  # from column 4, which predicts the first answer token
    assert trimmed["labels"].shape == (3, 8)
    results = []
    for inputs in (batch, trimmed):
        tuned.zero_grad(set_to_none=True)
        out = tuned(**inputs)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in tuned.parameters() if p.requires_grad],
                        out.logits.detach()))
    (full_loss, full_grads, full_logits), (loss, grads, logits) = results
    torch.testing.assert_close(logits, full_logits[:, -8:])  # virtual-token rows stripped only from full logits
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nothing_to_trim() -> None:
    batch = _batch()
    batch["labels"] = batch["input_ids"].clone()  # plain language modelling: every position counts
    assert answer_logits_only(batch) is batch
    batch["labels"] = torch.full_like(batch["input_ids"], IGNORE)
    assert answer_logits_only(batch) is batch
