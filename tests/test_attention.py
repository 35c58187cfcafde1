"""core.attention: transformers attention with `core.dropout`'s mask on the probabilities, against the
plain computation with the same mask; SDPA itself wherever it does not apply; the switch that sets a model
to it for a block and back."""

from __future__ import annotations

import pytest
import torch
from models import batch, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftkit.core import attention
from peftkit.core.dropout import LEVELS, keep_levels, new_seed, random_mask


class Module(nn.Module):
    def __init__(self, groups: int = 1, is_causal: bool = False) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def qkv(heads: int = 4, kv_heads: int = 4, length: int = 6, dim: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, heads, length, dim), (2, kv_heads, length, dim), (2, kv_heads, length, dim)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def reference(q, k, v, mask, p, seed_state, groups=1, causal=False, scale=None):
    """softmax(q·kᵀ·scale + mask) with the dropout mask `core.dropout` draws after `seed_state`, times v."""
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1).to(v.dtype)
    torch.set_rng_state(seed_state)
    keep = random_mask(probs, keep_levels(p), new_seed()) != 0
    return ((probs * keep * (LEVELS / keep_levels(p))) @ v).transpose(1, 2)


@pytest.mark.parametrize("case", ["bool mask", "float mask", "causal", "grouped kv", "no mask"])
def test_dropout_attention_is_the_plain_computation_with_its_mask(case):
    """Output and the gradients of q, k and v equal plain autograd's with the same dropout mask."""
    groups = 2 if case == "grouped kv" else 1
    q, k, v = qkv(kv_heads=4 // groups)
    mask = None
    if case == "bool mask":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[0, :, :, 4:] = False  # padding keys of the first row
    elif case == "float mask":
        mask = torch.zeros(2, 1, 6, 6)
        mask[1, :, :, :2] = torch.finfo(torch.float32).min
    module = Module(groups, is_causal=case == "causal")
    state = torch.get_rng_state()
    out, weights = attention.attention(module, q, k, v, mask, dropout=0.25, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 4, 8) and out.is_contiguous()
    grad = torch.randn_like(out)
    ours = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
    ref = reference(q, k, v, mask, 0.25, state, groups, case == "causal", scale=0.3)
    theirs = [ref.detach(), *torch.autograd.grad(ref, (q, k, v), grad)]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_in_bfloat16_the_scores_are_float32_and_the_rest_keeps_the_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.attention(Module(), q, k, v, None, dropout=0.1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [{"dropout": 0.0}, {"dropout": 0.2, "softcap": 30.0}, {"dropout": 1.0}])
def test_everything_else_is_sdpa_itself(kwargs, monkeypatch):
    """No dropout (evaluation), an option it does not handle: transformers' SDPA function is called as is."""
    q, k, v = qkv()
    calls = []
    monkeypatch.setattr(attention, "_sdpa", lambda: lambda *a, **kw: calls.append(kw) or (q, None))
    attention.attention(Module(), q, k, v, None, **kwargs)
    assert len(calls) == 1 and calls[0]["dropout"] == kwargs["dropout"]
    monkeypatch.undo()
    if "softcap" not in kwargs and kwargs["dropout"] == 0.0:
        expected, _ = sdpa_attention_forward(Module(), q, k, v, None, **kwargs)
        got, _ = attention.attention(Module(), q, k, v, None, **kwargs)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_the_switch_sets_a_model_to_it_and_back_however_the_block_ends(build):
    model = build()
    assert model.config._attn_implementation == "sdpa"
    with attention.dropout_attention(model) as switched:
        assert switched == 1 and model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), attention.dropout_attention(model):
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_on_another_implementation_is_left_alone():
    model = tiny_gpt2()
    model.set_attn_implementation("eager")
    with attention.dropout_attention(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "eager"
    with attention.dropout_attention(nn.Linear(2, 2)) as switched:
        assert switched == 0


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_switched_model_without_dropout_gives_sdpas_outputs_exactly(name):
    """Padding masks (BERT) and causal masks (Llama) reach it as they reach SDPA: with no dropout to draw
    the forward is SDPA's, bit for bit, in training mode too."""
    model = {"bert": tiny_bert, "llama": tiny_llama}[name]().train()
    inputs = batch(name)
    expected = model(**inputs).logits
    with attention.dropout_attention(model):
        got = model(**inputs).logits
    assert torch.equal(got, expected)


def test_a_switched_bert_with_attention_dropout_uses_the_cheaper_mask(monkeypatch):
    """With attention dropout on and in training, the probabilities go through `core.dropout`'s mask."""
    model = tiny_bert()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.2
    model.train()
    calls = []
    real = attention.dropout_masks.masked_dropout
    monkeypatch.setattr(attention.dropout_masks, "masked_dropout", lambda x, p: calls.append(p) or real(x, p))
    with attention.dropout_attention(model):
        out = model(**batch("bert"))
        out.loss.backward()
    assert calls == [0.2] * model.config.num_hidden_layers
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_key_value_prefixes_route_through_it(name, monkeypatch):
    """Prefix tuning routes attention through its own registered function, which then calls whatever the model
    was set to: with the switch on, that is this one, with the prefix rows in front of the keys and the mask
    widened for them (the same result as SDPA's when there is no dropout to draw)."""
    import peftkit

    model = {"bert": tiny_bert, "llama": tiny_llama}[name]()
    tuned = peftkit.attach(model, peftkit.config("prefix_tuning", num_virtual_tokens=3)).train()
    inputs = batch(name)
    expected = tuned(**inputs).logits
    seen = []
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a, **kw: seen.append(a[2].shape) or real(*a, **kw))
    from transformers import AttentionInterface

    attention._register()
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, attention.attention)
    with attention.dropout_attention(tuned):
        got = tuned(**inputs).logits
        got.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert seen and all(shape[2] == inputs["input_ids"].shape[1] + 3 for shape in seen)  # keys: 3 prefix rows first


def test_a_model_that_refuses_the_name_keeps_sdpa(monkeypatch):
    """The switch is an optimisation: a model whose transformers refuses the implementation trains as it was."""
    model = tiny_bert()

    def refuse(name, *args, **kwargs):
        raise ValueError(f"{name} is not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with attention.dropout_attention(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
