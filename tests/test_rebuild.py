"""LoRA rebuilds its input in backward from what the input's producer keeps (`core.rebuild`): the same
outputs and gradients bit for bit as keeping the input, fewer bytes kept, and the input kept wherever a
rebuild is not safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import batch, loss_of, tiny_bert, tiny_llama
from test_lora_kernel import saved_bytes
from torch import nn

import peftkit
from peftkit.core import rebuild
from peftkit.core.rebuild import Rebuilder
from peftkit.methods.reparameterized.lora_kernel import down, up


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _layer_norm() -> nn.LayerNorm:
    norm = nn.LayerNorm(16, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        norm.bias.copy_(torch.linspace(-0.5, 0.5, 16))
    return norm.requires_grad_(False)


NORM, OTHER_NORM = _layer_norm(), _layer_norm()
REBUILDER = Rebuilder(NORM)  # knows NORM's epsilon, not OTHER_NORM's


def _rms_norm(h: torch.Tensor) -> torch.Tensor:  # Llama's: float32 statistics, a frozen scale
    scale = torch.linspace(0.5, 1.5, h.shape[-1])
    hf = h.to(torch.float32)
    return scale * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


def _attention_output(h: torch.Tensor) -> torch.Tensor:  # (batch, length, heads·dim) from a probs·values product
    b, n, _ = h.shape
    heads = h.view(b, n, 4, 4).transpose(1, 2)
    probs = torch.softmax(heads @ heads.transpose(-1, -2), dim=-1)
    return torch.matmul(probs, heads).transpose(1, 2).contiguous().view(b, n, 16)


PRODUCERS = {
    "gelu": lambda h: F.gelu(h),
    "silu": lambda h: F.silu(h),
    "product of two activations": lambda h: F.silu(h) * (h * 2),
    "layer norm": NORM,
    "rms norm": _rms_norm,
    "attention output": _attention_output,
}


def _lora_step(producer, p: float, autocast: bool):
    """(outputs and gradients, bytes kept) of LoRA on query and value reading producer(h)."""
    h = _randn(3, 5, 16, seed=0)
    factors = [(_randn(4, 16, seed=1 + i), _randn(8, 4, seed=3 + i)) for i in range(2)]
    torch.manual_seed(5)  # the dropout mask
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        def forward():
            hs = down(producer(h), [A for A, _ in factors], p, training=True, rebuilder=REBUILDER)
            return sum(up(None, hi, B, 0.5).float().pow(2).sum() for hi, (_, B) in zip(hs, factors, strict=True))
        kept = saved_bytes(forward)
    return [t.grad for t in (h, *(t for pair in factors for t in pair))], kept


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("producer", PRODUCERS)
def test_an_input_rebuilt_gives_the_same_gradients_and_keeps_less(producer, p, autocast):
    rebuilt, kept_rebuilt = _lora_step(PRODUCERS[producer], p, autocast)
    with rebuild.disabled():
        reference, kept_reference = _lora_step(PRODUCERS[producer], p, autocast)
    for ours, theirs in zip(rebuilt, reference, strict=True):
        assert torch.equal(ours, theirs)
    x_bytes = 3 * 5 * 16 * (2 if autocast else 4)  # what the kernel kept of x: x as the products use it
    assert kept_rebuilt == kept_reference - x_bytes


def _kept_and_gradients(producer, counted_by_a_marked_hook: bool = True, rebuilder: Rebuilder = REBUILDER):
    h = _randn(2, 3, 16, seed=0)
    A, B = _randn(4, 16, seed=1), _randn(8, 4, seed=2)
    step = lambda: up(None, down(producer(h), [A], rebuilder=rebuilder)[0], B, 1.0)  # noqa: E731
    if counted_by_a_marked_hook:
        kept = saved_bytes(step)
    else:  # a hook that is not marked transparent: it may move or recompute what it packs, so nothing is rebuilt
        storages = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            out = step()
        out.sum().backward()
        kept = sum(storages.values())
    return kept, [h.grad, A.grad, B.grad]


@pytest.mark.parametrize("case", ["unknown layer norm epsilon", "op not listed", "no producer", "other hooks"])
def test_the_input_is_kept_where_a_rebuild_is_not_safe(case):
    producer = {"unknown layer norm epsilon": OTHER_NORM, "op not listed": torch.tanh,
                "no producer": lambda h: h.detach(), "other hooks": F.gelu}[case]
    marked = case != "other hooks"
    kept, grads = _kept_and_gradients(producer, marked)
    with rebuild.disabled():
        kept_reference, reference = _kept_and_gradients(producer, marked)
    assert kept == kept_reference
    for ours, theirs in zip(grads, reference, strict=True):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    if case == "other hooks":  # the same under a marked hook keeps less: the case is not vacuous
        assert _kept_and_gradients(producer)[0] < kept


def test_a_rebuild_that_differs_from_the_input_is_never_used(monkeypatch):
    """Every plan is checked against the input once: a producer rebuilt differently keeps x from then on."""
    run_gelu = rebuild._OPS["GeluBackward0"]
    monkeypatch.setitem(rebuild._OPS, "GeluBackward0", (run_gelu[0], lambda p, x: F.gelu(x, approximate="tanh")))
    rebuilder = Rebuilder(nn.Linear(1, 1))
    kept, grads = _kept_and_gradients(F.gelu, rebuilder=rebuilder)
    assert list(rebuilder._checked.values()) == [False]
    with rebuild.disabled():
        kept_reference, reference = _kept_and_gradients(F.gelu)
    assert kept == kept_reference
    for ours, theirs in zip(grads, reference, strict=True):
        assert torch.equal(ours, theirs)


def _model_step(make, name: str, p: float, autocast: bool, method: str = "lora", plain: bool = False):
    torch.manual_seed(0)
    config = peftkit.config("lora", targets="all-linear", dropout=p) if method == "lora" else peftkit.config(method)
    model = peftkit.attach(make(), config).train()
    if plain:  # deltas without a rebuilder run plain autograd
        for module in model.modules():
            if getattr(module, "rebuilder", None) is not None:
                module.rebuilder = None
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kept = saved_bytes(lambda: loss_of(model(**batch(name))))
    return [t.grad for t in model.trainable_parameters()], kept


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_lora_on_every_linear_layer_of_a_model_trains_the_same_and_keeps_less(name, p, autocast):
    make = {"bert": tiny_bert, "llama": tiny_llama}[name]
    grads, kept = _model_step(make, name, p, autocast)
    with rebuild.disabled():
        reference, kept_reference = _model_step(make, name, p, autocast)
    for ours, theirs in zip(grads, reference, strict=True):
        assert torch.equal(ours, theirs)
    assert kept < kept_reference


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_ia3_scaling_the_feedforward_input_trains_the_same_and_keeps_less(name, autocast):
    """(IA)³'s scale on the FFN down projection's input needs that input for its gradient: rebuilt from the
    GELU's input (BERT) or the gated product's factors (Llama), not kept; the gradients are plain autograd's."""
    make = {"bert": tiny_bert, "llama": tiny_llama}[name]
    grads, kept = _model_step(make, name, 0.0, autocast, method="ia3")
    reference, kept_reference = _model_step(make, name, 0.0, autocast, method="ia3", plain=True)
    for ours, theirs in zip(grads, reference, strict=True):
        assert torch.equal(ours, theirs)
    assert kept < kept_reference


def test_a_copied_or_pickled_model_trains_as_the_original():
    """The rebuilder holds weak references to its model's norms: a copy drops them (and keeps those inputs)."""
    import copy
    import pickle

    def gradients(model):
        loss_of(model(**batch("bert"))).backward()
        return [t.grad for t in model.trainable_parameters()]

    tuned = peftkit.attach(tiny_bert(), peftkit.config("lora", targets="all-linear")).train()
    for clone in (copy.deepcopy(tuned), pickle.loads(pickle.dumps(tuned))):
        for ours, theirs in zip(gradients(clone), gradients(tuned), strict=True):
            assert torch.equal(ours, theirs)
        tuned.zero_grad(set_to_none=True)
