"""The CUDA paths of the performance work: the LoRA kernel's mask and products, the chunked loss and
half-precision autocast on a GPU give what the CPU gives (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS, batch

import peftkit
from peftkit.methods.reparameterized.lora_kernel import down, up
from peftkit.train.vocab_loss import VocabLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_lora_kernel_on_cuda_equals_the_cpu_for_the_same_mask():
    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(4, 9, 32, generator=g), torch.randn(8, 32, generator=g), torch.randn(16, 8, generator=g)
    mask = torch.rand(x.shape, generator=g) >= 0.1
    grads = []
    for device in ("cpu", "cuda"):
        xs, As, Bs = (t.to(device).requires_grad_() for t in (x, A, B))
        out = up(None, down(xs, [As], 0.1, True, mask.to(device))[0], Bs, 2.0)
        out.square().sum().backward()
        grads.append([out.detach().cpu()] + [t.grad.cpu() for t in (xs, As, Bs)])
    for cpu, cuda in zip(*grads, strict=True):
        torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=1e-4)


def test_fresh_dropout_masks_on_cuda_keep_the_right_share():
    x = torch.ones(256, 1024, device="cuda", requires_grad=True)
    A = torch.ones(1, 1024, device="cuda", requires_grad=True)
    h = down(x, [A], 0.25, True)[0]  # each row: (kept entries) / keep
    kept = (h * 0.75).sum() / x.numel()
    assert abs(float(kept) - 0.75) < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_training_step_under_cuda_autocast(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    tuned = peftkit.attach(BUILDERS["llama"]().cuda(), peftkit.config("lora", dropout=0.1)).train()
    inputs = {k: v.cuda() for k, v in batch("llama").items()}
    with torch.autocast("cuda", dtype=dtype):
        loss = tuned(**inputs).loss
    loss.backward()
    grads = [p.grad for p in tuned.trainable_parameters()]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_chunked_loss_on_cuda_equals_the_models_own():
    torch.manual_seed(0)
    tuned = peftkit.attach(BUILDERS["llama"]().cuda(), peftkit.config("lora", init="random")).train()
    inputs = {k: v.cuda() for k, v in batch("llama").items()}
    vocab = VocabLoss(tuned)
    assert vocab.usable and vocab.probe(tuned, inputs)
    own = tuned(**inputs).loss
    torch.testing.assert_close(vocab.loss(tuned, inputs)[1], own, atol=1e-5, rtol=1e-5)
