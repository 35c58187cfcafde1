"""The chunked causal-LM loss: the same loss and gradients as transformers' own, without the logits."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS

import peftkit
from peftkit.train import vocab_loss
from peftkit.train.vocab_loss import VocabLoss


def inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that takes no loss
    labels[2, -3:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_same_loss_and_gradients_as_the_models_own(name, method, monkeypatch):
    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 2 * 96)  # two rows per chunk: many chunks
    runs = []
    for chunked in (False, True):
        torch.manual_seed(0)
        tuned = peftkit.attach(BUILDERS[name](), peftkit.config(method)).train()
        batch = inputs(name)
        vocab = VocabLoss(tuned)
        assert vocab.probe(tuned, batch)
        loss = vocab.loss(tuned, batch)[1] if chunked else tuned(**batch).loss
        loss.backward()
        runs.append([loss.detach(), *(p.grad for p in tuned.trainable_parameters())])
    for ours, reference in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_model_that_changes_its_logits_keeps_its_own_loss():
    model = BUILDERS["llama"]()
    model.lm_head.register_forward_hook(lambda _m, _a, out: 30 * torch.tanh(out / 30))  # soft-capping
    assert not VocabLoss(model).probe(model, inputs("llama"))


def test_never_holds_the_logits():
    """What backward keeps is the hidden states and a number per row, not tokens × vocabulary."""
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    head = torch.nn.Linear(16, 5000, bias=False).requires_grad_(False)
    labels = torch.randint(0, 5000, (2, 64))
    seen, kept = set(), 0

    def pack(t):
        nonlocal kept
        if t.untyped_storage().data_ptr() not in seen and t is not head.weight:  # the weight is the model's own
            seen.add(t.untyped_storage().data_ptr())
            kept += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vocab_loss.causal_lm_loss(hidden, head, labels)
    loss.backward()
    assert kept < hidden.numel() * 4 + 2 * 64 * 8 * 2 + 4096  # hidden, labels, a log-sum-exp per row
    assert kept < 2 * 63 * 5000 * 4 / 10  # a tenth of the float32 logits


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gradients_for_a_trained_head_with_bias(rows):
    """Full fine-tuning trains the output projection too: its weight and bias get the reference gradients."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 26, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 300)
    labels = torch.randint(0, 300, (2, 26), generator=g)
    labels[0, :9] = -100
    reference = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 300), labels[:, 1:].reshape(-1))
    expected = torch.autograd.grad(2.5 * reference, (hidden, head.weight, head.bias))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vocab_loss, "CHUNK_ELEMENTS", rows * 300)
        loss = vocab_loss.causal_lm_loss(hidden, head, labels)
    got = torch.autograd.grad(2.5 * loss, (hidden, head.weight, head.bias))
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_under_no_grad_it_computes_only_the_loss(monkeypatch):
    """An evaluation does not pay for gradients it will never use (the softmax is made only for them)."""
    calls = []
    real = torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda t: calls.append(1) or real(t))
    hidden, head = torch.randn(1, 10, 8, requires_grad=True), torch.nn.Linear(8, 50)
    with torch.no_grad():
        vocab_loss.causal_lm_loss(hidden, head, torch.randint(0, 50, (1, 10)))
    assert calls == []
    vocab_loss.causal_lm_loss(hidden, head, torch.randint(0, 50, (1, 10)))
    assert calls


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_under_bf16_autocast_the_same_loss_and_gradients_as_the_models_own(method, monkeypatch):
    """`--precision bf16`: a bfloat16 base under autocast; the model's own loss takes bfloat16 logits to
    float32, and so does this one."""
    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 5 * 96)
    runs = []
    for chunked in (False, True):
        torch.manual_seed(0)
        tuned = peftkit.attach(BUILDERS["llama"]().to(torch.bfloat16), peftkit.config(method)).train()
        batch = inputs("llama")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = VocabLoss(tuned).loss(tuned, batch)[1] if chunked else tuned(**batch).loss
        loss.backward()
        runs.append([loss.detach().float(), *(p.grad.float() for p in tuned.trainable_parameters())])
    for ours, reference in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=2e-2, rtol=2e-2)


def test_under_bf16_autocast_a_trained_head_gets_its_gradients():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 20, 16, generator=g).to(torch.bfloat16).requires_grad_()
    head = torch.nn.Linear(16, 400).to(torch.bfloat16)
    labels = torch.randint(0, 400, (2, 20), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).float().reshape(-1, 400),
                                                      labels[:, 1:].reshape(-1))
    expected = torch.autograd.grad(reference, (hidden, head.weight, head.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vocab_loss.causal_lm_loss(hidden, head, labels)
    got = torch.autograd.grad(loss, (hidden, head.weight, head.bias))
    torch.testing.assert_close(loss, reference, atol=1e-2, rtol=1e-2)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2, rtol=5e-2)


def test_the_head_itself_never_runs_and_only_labelled_rows_are_projected(monkeypatch):
    """The output projection is skipped (not run and its logits dropped), also for a strided slice of the
    hidden states (``logits_to_keep``); the chunks project only rows that take a loss; the loss and
    gradients are still the model's own."""
    from peftkit.train.batches import answer_logits_only

    torch.manual_seed(0)
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config("lora")).train()
    batch = inputs("llama")
    batch["labels"][:, :4] = -100  # every row's prompt: the logits start at its end
    batch = answer_logits_only(batch)
    assert "logits_to_keep" in batch
    expected = tuned(**batch).loss
    expected.backward()
    reference = [p.grad.clone() for p in tuned.trainable_parameters()]
    tuned.zero_grad()
    head = tuned.model.lm_head
    head.__class__ = type("Refusing", (torch.nn.Linear,), {"forward": lambda *a, **k: pytest.fail("the head ran")})
    projected = []
    real_linear = vocab_loss.F.linear

    def spy(h, w, *args):
        if w.data_ptr() == head.weight.data_ptr():
            projected.append(h.shape[0])
        return real_linear(h, w, *args)

    monkeypatch.setattr(vocab_loss.F, "linear", spy)
    loss = VocabLoss(tuned).loss(tuned, batch)[1]
    loss.backward()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert sum(projected) == labelled
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip((p.grad for p in tuned.trainable_parameters()), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert "forward" not in head.__dict__  # the head is itself again
