"""LoRA's autograd function against plain autograd: the same outputs and gradients for the same
dropout mask, and less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.core import rebuild
from peftkit.methods.reparameterized.lora_kernel import down, up


def low_rank(x, factors, p=0.0, training=False, mask=None, y=None):
    """The kernel's two functions composed: ``[y +] s_i · B_i · A_i · dropout(x)`` for each factor pair."""
    hs = down(x, [A for A, _, _ in factors], p, training, mask)
    return [up(y, h, B, s) for h, (_, B, s) in zip(hs, factors, strict=True)]


def plain(x, A, B, scaling, mask, keep):
    dropped = x if mask is None else x * mask / keep
    return F.linear(F.linear(dropped, A), B) * scaling


# float32 sums in another order on another CPU (AVX-512 against AVX2 kernels) differ by a few ulps of O(1) values
def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    return x, A, B


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_same_outputs_and_gradients_as_plain_autograd_for_the_same_mask(p):
    x, A, B = tensors()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p if p else None
    grad = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (plain, None):
        for t in (x, A, B):
            t.grad = None
        if fn is None:
            (out,) = low_rank(x, [(A, B, 0.5)], p, training=True, mask=mask)
        else:
            out = plain(x, A, B, 0.5, mask, 1 - p)
        out.backward(grad)
        results.append([out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_no_dropout_outside_training_and_a_fresh_mask_inside():
    x, A, B = tensors()
    torch.testing.assert_close(low_rank(x, [(A, B, 1.0)], 0.3, training=False)[0], plain(x, A, B, 1.0, None, 1.0),
                               atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    first = low_rank(x, [(A, B, 1.0)], 0.3, training=True)[0]
    torch.manual_seed(1)
    assert not torch.equal(first, low_rank(x, [(A, B, 1.0)], 0.3, training=True)[0])


def saved_bytes(fn) -> int:
    seen, total = set(), 0

    @rebuild.transparent  # counting keeps tensors as they are: rebuilt inputs count as they are kept
    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return total


def test_keeps_less_for_backward_than_plain_autograd():
    """Two projections reading one input (query and value): plain autograd keeps a dropped copy of x,
    a mask and h for each; the kernel keeps x and one byte-per-entry mask once, each h and the factors."""
    x = torch.randn(64, 128, 256, requires_grad=True)
    factors = [(torch.randn(8, 256, requires_grad=True), torch.randn(256, 8, requires_grad=True)) for _ in range(2)]
    masks = [torch.rand(x.shape) >= 0.1 for _ in range(2)]
    ours = saved_bytes(lambda: sum(low_rank(x, [(A, B, 2.0) for A, B in factors], 0.1, training=True)))
    reference = saved_bytes(lambda: sum(plain(x, A, B, 2.0, m, 0.9) for (A, B), m in zip(factors, masks, strict=True)))
    x_bytes = x.numel() * 4
    small = sum(A.numel() + B.numel() + x[..., :8].numel() for A, B in factors) * 4  # factors and each h
    assert ours <= x_bytes + x.numel() + 8 + small  # the mask's storage may hold two spare entries
    assert reference >= 2 * (x_bytes + x.numel())  # per projection: the dropped copy and a byte per mask entry


@pytest.mark.parametrize("x_takes_a_gradient", [True, False])
def test_without_dropout_it_keeps_what_plain_autograd_keeps_and_no_more(x_takes_a_gradient):
    """Without dropout both keep x, each h and B, and A only where x takes a gradient (a first layer's input
    does not): nothing is recomputed in backward, and nothing extra is kept."""
    x = torch.randn(16, 32, 64, requires_grad=x_takes_a_gradient)
    factors = [(torch.randn(8, 64, requires_grad=True), torch.randn(64, 8, requires_grad=True)) for _ in range(2)]
    ours = saved_bytes(lambda: sum(low_rank(x, [(A, B, 2.0) for A, B in factors])))
    reference = saved_bytes(lambda: sum(plain(x, A, B, 2.0, None, 1.0) for A, B in factors))
    assert ours == reference


def test_a_generated_mask_is_the_same_in_forward_and_backward():
    """The mask drawn from the seed in forward is the one backward applies: the gradients are those of that
    mask, drawn again here from the same seed."""
    from peftkit.core.dropout import LEVELS as _LEVELS
    from peftkit.core.dropout import keep_levels
    from peftkit.core.dropout import random_mask as _mask

    x, A, B = tensors()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what low_rank draws
    keep = keep_levels(0.2) / _LEVELS
    mask = _mask(x, keep_levels(0.2), seed) != 0  # -1 where kept
    grad = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    (out,) = low_rank(x, [(A, B, 0.5)], 0.2, training=True)
    out.backward(grad)
    ours = [out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()]
    for t in (x, A, B):
        t.grad = None
    reference = plain(x, A, B, 0.5, mask, keep)
    reference.backward(grad)
    for a, b in zip(ours, [reference.detach(), x.grad, A.grad, B.grad], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_projections_reading_one_input_run_as_one(p):
    """Three factor pairs over one x (query, key, value; ranks may differ): outputs and gradients are
    those of three separate plain computations with the one shared mask, and a gradient that arrives
    for only some of the outputs is handled."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    factors = [(torch.randn(r, 16, generator=g, requires_grad=True), torch.randn(o, r, generator=g, requires_grad=True), s)
               for r, o, s in ((4, 8, 0.5), (2, 8, 2.0), (4, 12, 1.0))]
    mask = torch.rand(x.shape, generator=g) >= p if p else None
    grads = [torch.randn(2, 6, o, generator=g) for o in (8, 8, 12)]
    for used in ([0, 1, 2], [0, 2]):
        results = []
        for fused in (True, False):
            for t in (x, *(t for A, B, _ in factors for t in (A, B))):
                t.grad = None
            if fused:
                outs = low_rank(x, factors, p, training=True, mask=mask)
            else:
                outs = [plain(x, A, B, s, mask, 1 - p) for A, B, s in factors]
            torch.autograd.backward([outs[i] for i in used], [grads[i] for i in used])
            results.append([o.detach() for o in outs] + [t.grad for t in (x, *(t for A, B, _ in factors for t in (A, B)))])
        for ours, reference in zip(*results, strict=True):
            if reference is None:
                assert ours is None or not ours.any()
            else:
                torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_grouped_projections_in_a_model_compute_what_separate_ones_do(name):
    """LoRA on every linear layer: query/key/value (and Llama's gate/up) run as one group; the model's
    outputs and every adapter gradient match the same adapter run projection by projection."""
    from models import BUILDERS, batch, output_tensor

    import peftkit
    from peftkit.methods.reparameterized.lora import LoraLinear

    runs = []
    for grouped in (True, False):
        torch.manual_seed(0)
        tuned = peftkit.attach(BUILDERS[name](), peftkit.config("lora", targets="all-linear", init="random"))
        deltas = [m for m in tuned.modules() if isinstance(m, LoraLinear)]
        if name != "gpt2":  # GPT-2 fuses q, k, v into one layer: nothing to group
            assert any(d.shared is not None for d in deltas)
        if not grouped:
            for d in deltas:
                d.shared = None
        tuned.train()
        out = tuned(**batch(name))
        out.loss.backward()
        runs.append([output_tensor(out).detach(), *(p.grad for p in tuned.trainable_parameters())])
    for ours, reference in zip(*runs, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_the_addition_into_the_output_is_exact():
    """`up` with an output adds into it in one addmm: y + s·h·Bᵀ, and y's gradient passes through."""
    x, A, B = tensors()
    y = torch.randn(3, 5, 8, requires_grad=True)
    grad = torch.randn(3, 5, 8)
    (fused,) = low_rank(x, [(A, B, 0.5)], y=y)
    fused.backward(grad)
    ours = [fused.detach(), y.grad.clone(), x.grad.clone(), A.grad.clone(), B.grad.clone()]
    for t in (x, A, B, y):
        t.grad = None
    reference = y + plain(x, A, B, 0.5, None, 1.0)
    reference.backward(grad)
    for a, b in zip(ours, [reference.detach(), y.grad, x.grad, A.grad, B.grad], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("y_grad", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_adding_into_the_output_in_place_computes_the_same_and_returns_it(y_grad, bias):
    """With ``overwrite`` the sum goes into y itself (y is returned, no copy) and every gradient is the
    out-of-place one's, also when y does not require grad (a first layer over frozen embeddings). A
    layer output that is a view (F.linear with a bias on 3-D input) is added into through its base, the
    (rows, out) product: through the view, autograd would copy the gradient via the base in backward."""
    results = []
    for overwrite in (False, True):
        x, A, B = tensors()
        g = torch.Generator().manual_seed(5)
        weight = torch.randn(8, 16, generator=g, requires_grad=y_grad)
        b = torch.randn(8, generator=g) if bias else None
        y = F.linear(x.detach(), weight, b)  # a base layer's output: its product kept its inputs, not y
        (h,) = down(x, [A])
        out = up(y, h, B, 0.5, overwrite=overwrite)
        assert (out.data_ptr() == y.data_ptr()) == overwrite  # the sum is in y's own storage
        assert (out is y) == (overwrite and not bias)  # a view: added into its (rows, out) base instead
        assert "CopySlices" not in type(out.grad_fn).__name__
        out.backward(torch.ones_like(out))
        results.append([out.detach(), x.grad, A.grad, B.grad] + ([weight.grad] if y_grad else []))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_host_adds_in_place_only_where_no_one_else_sees_the_output(monkeypatch):
    """One adapter on plain linear layers: in place. A forward hook on the base layer may keep its output:
    then the host must not add into it."""
    from models import batch, tiny_bert

    import peftkit
    from peftkit.methods.reparameterized import lora_kernel

    model = peftkit.attach(tiny_bert(), peftkit.config("lora", init="random"))
    inputs = batch("bert")
    flags = []
    real = lora_kernel._Up.apply
    monkeypatch.setattr(lora_kernel._Up, "apply", lambda *a: flags.append(a[-1]) or real(*a))
    with torch.inference_mode():
        expected = model(**inputs).logits
    assert flags and all(flags)
    kept = []
    host = model.get_submodule("model.bert.encoder.layer.0.attention.self.query")
    host.base_layer.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, expected)
    seen, copy = kept[0]
    assert torch.equal(seen, copy)  # what the hook kept is the base output, untouched
    assert flags.count(False) == 1


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_under_autocast_it_computes_what_plain_autocast_does_and_keeps_x_as_it_comes(p):
    """A bfloat16 layer under bfloat16 autocast: the products run in bfloat16 as plain autograd's would,
    float32 parameters get float32 gradients, and what backward keeps of x is the bfloat16 x itself."""
    x, A, B = tensors()
    x = x.detach().to(torch.bfloat16).requires_grad_()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p if p else None
    grad = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    results, kept = [], []

    def pack(t):
        kept.append(t)
        return t

    for ours in (False, True):
        for t in (x, A, B):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = low_rank(x, [(A, B, 0.5)], p, training=True, mask=mask)[0] if ours else plain(x, A, B, 0.5, mask, 1 - p)
        out.backward(grad)
        results.append([out.detach().float(), x.grad.float(), A.grad, B.grad])
    assert out.dtype == torch.bfloat16 and A.grad.dtype == B.grad.dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in kept)  # x never upcast to a float32 copy
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=0.1, rtol=0.02)  # bfloat16: 8 bits of mantissa


def test_a_bf16_model_under_autocast_keeps_no_float32_activations(monkeypatch):
    """`--precision bf16` (a bfloat16 base, bfloat16 autocast, float32 LoRA factors): nothing LoRA keeps
    for backward is a float32 copy of a layer's input."""
    from models import batch, loss_of, tiny_llama

    import peftkit
    from peftkit.methods.reparameterized import lora_kernel

    kept = []
    for function in (lora_kernel._Down, lora_kernel._Up):
        def forward(ctx, *args, _original=function.forward):
            out = _original(ctx, *args)
            kept.extend(t for t in ctx.to_save if t is not None and not isinstance(t, torch.nn.Parameter))
            return out

        monkeypatch.setattr(function, "forward", staticmethod(forward))
    tuned = peftkit.attach(tiny_llama().to(torch.bfloat16), peftkit.config("lora", targets="all-linear")).train()
    # with inputs kept, not rebuilt from the float32 tensors a norm's backward keeps for itself (test_rebuild.py)
    with torch.autocast("cpu", dtype=torch.bfloat16), rebuild.disabled():
        loss = loss_of(tuned(**batch("llama")))
    loss.backward()
    assert kept and all(t.dtype in (torch.bfloat16, torch.bool) for t in kept), {(t.dtype, tuple(t.shape)) for t in kept}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tuned.trainable_parameters())
