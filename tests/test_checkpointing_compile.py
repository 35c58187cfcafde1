"""Gradient checkpointing with every method, and torch.compile with the common ones: the same loss and
the same gradients as the plain eager step (memory and speed are measured in benchmarks/perf.py)."""

from __future__ import annotations

import pytest
import torch
from cases import MODELS, VARIANTS
from models import BUILDERS, batch

import peftkit

CHECKPOINTED_MODELS = ("bert", "llama")


def _tuned(method: str, model: str, options: dict) -> peftkit.TunedModel:
    torch.manual_seed(0)
    tuned = peftkit.attach(BUILDERS[model](), peftkit.config(method, **options))
    if tuned.needs_calibration:
        tuned.calibrate([batch(model)])
    return tuned.train()


def _step(model: torch.nn.Module, tuned: peftkit.TunedModel, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks on both sides
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in tuned.trainable_parameters() if p.grad is not None]


def _checkpointing_cases() -> list:
    out = []
    for method in peftkit.methods():
        options = VARIANTS.get(method, [{}])[0]
        models = MODELS.get(method, CHECKPOINTED_MODELS) or ("llama",)  # qlora: its own quantized base on both sides
        out += [pytest.param(method, m, options, id=f"{method}-{m}") for m in models if m in CHECKPOINTED_MODELS]
    return out


@pytest.mark.parametrize("method,model,options", _checkpointing_cases())
def test_gradient_checkpointing_gives_the_same_gradients(method, model, options):
    inputs = batch(model)
    plain = _tuned(method, model, options)
    checkpointed = _tuned(method, model, options)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.model.is_gradient_checkpointing
    loss, grads = _step(plain, plain, inputs)
    loss_c, grads_c = _step(checkpointed, checkpointed, inputs)
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-5)
    assert len(grads_c) == len(grads) > 0
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# Capture (dynamo + AOT autograd, where peftkit's code matters) for each; inductor's generated code once.
# LoRA without dropout: compiled, it draws its mask with nn.Dropout (another random stream than the eager kernel's).
COMPILED = [("lora", "bert", {"dropout": 0.0}, "inductor"), ("lora", "llama", {"dropout": 0.0}, "aot_eager"),
            ("ia3", "bert", {}, "aot_eager"), ("adapter", "llama", {}, "aot_eager"),
            ("prefix_tuning", "llama", {"num_virtual_tokens": 3}, "aot_eager"),
            ("prefix_tuning", "bert", {"num_virtual_tokens": 3}, "aot_eager")]


@pytest.mark.parametrize("method,model,options,backend", COMPILED, ids=[f"{m}-{n}-{b}" for m, n, _, b in COMPILED])
def test_torch_compile_trains_and_infers_like_eager(method, model, options, backend):
    """Compiled random numbers are not eager's stream, so dropout is compared with fallback_random."""
    torch._dynamo.reset()
    inputs = batch(model)
    eager = _tuned(method, model, options)
    tuned = _tuned(method, model, options)
    compiled = torch.compile(tuned, backend=backend)
    with torch._inductor.config.patch(fallback_random=True):
        loss_c, grads_c = _step(compiled, tuned, inputs)
    loss, grads = _step(eager, eager, inputs)
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-4)
    assert len(grads_c) == len(grads) > 0
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    eager.eval(), tuned.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, eager(**inputs).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,options", [("lora", {"dropout": 0.1}), ("ia3", {}), ("adapter", {}),
                                            ("parallel_adapter", {}), ("prompt_tuning", {})])
def test_compiles_to_one_graph(method, options):
    """No graph breaks: the compiler sees the whole training forward (LoRA's eager kernel steps aside)."""
    torch._dynamo.reset()
    tuned = _tuned(method, "llama", options)
    explained = torch._dynamo.explain(tuned)(**batch("llama"))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("method,options", [("head_only", {}), ("layer_tuning", {"last_k": 1}), ("lora", {})])
def test_gradient_checkpointing_never_runs_backward_below_the_lowest_trainable_layer(method, options):
    """transformers' checkpointing switch also makes the embeddings' output require grad, which only reentrant
    checkpointing needs; non-reentrant (the default) must not pay for it: no gradient reaches the
    embeddings' output, and checkpointed a model keeps no more for backward than plain beyond each block's
    input (which checkpointing holds for its recomputation)."""
    from test_lora_kernel import saved_bytes

    inputs = batch("bert")
    plain, checkpointed = _tuned(method, "bert", options), _tuned(method, "bert", options)
    checkpointed.gradient_checkpointing_enable()
    embedded = []
    checkpointed.model.get_input_embeddings().register_forward_hook(lambda m, i, out: embedded.append(out))
    kept = saved_bytes(lambda: checkpointed(**inputs).loss)
    assert not embedded[0].requires_grad
    block_inputs = checkpointed.model.config.num_hidden_layers * 2 * embedded[0].numel() * embedded[0].element_size()
    assert kept <= saved_bytes(lambda: plain(**inputs).loss) + block_inputs


def test_a_callers_own_input_grad_hook_survives_checkpointing():
    tuned = _tuned("lora", "bert", {})
    tuned.model.enable_input_require_grads()
    tuned.gradient_checkpointing_enable()
    embedded = []
    tuned.model.get_input_embeddings().register_forward_hook(lambda m, i, out: embedded.append(out))
    tuned(**batch("bert"))
    assert embedded[0].requires_grad
