"""Pruning the base: magnitude (unstructured, N:M), structured heads / FFN channels, files, recovery."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batch, loss_of, tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit import prune
from peftkit.core.linear import linear_weight
from peftkit.quant import quantize


def logits(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch(name).items() if k != "labels"}).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {n: linear_weight(m).detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}


def test_magnitude_prune_per_layer_and_global():
    model = tiny_llama()
    before = weights(model)
    report = prune.magnitude_prune(model, 0.5)
    assert report.sparsity == 0.5 and report.params_after == report.params_before
    for stats in report.layers:
        old, new = before[stats.name], linear_weight(model.get_submodule(stats.name))
        assert stats.sparsity == 0.5 and stats.zeros == (new == 0).sum()
        kept, dropped = old[new != 0].abs(), old[new == 0].abs()
        assert kept.min() >= dropped.max()  # the smallest magnitudes went
        assert torch.equal(new[new != 0], old[new != 0])
    assert torch.equal(linear_weight(model.lm_head), before["lm_head"])  # heads are not targets
    model = tiny_bert()
    biases = {n: m.bias.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = prune.magnitude_prune(model, 0.3, scope="global")
    assert abs(report.sparsity - 0.3) < 0.01 and len({round(s.sparsity, 2) for s in report.layers}) > 1
    assert all(torch.equal(m.bias, biases[n]) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(peftkit.errors.ConfigError, match="sparsity"):
        prune.magnitude_prune(tiny_llama(), 1.0)
    with pytest.raises(peftkit.errors.ConfigError, match="scope"):
        prune.magnitude_prune(tiny_llama(), 0.5, scope="net")


def test_nm_prune_two_of_four():
    model = tiny_gpt2()  # Conv1D layers: groups run along the input dimension of the (out, in) view
    before = weights(model)
    report = prune.nm_prune(model, 2, 4)
    assert report.sparsity == 0.5
    for stats in report.layers:
        old = before[stats.name].reshape(stats.shape[0], -1, 4)
        new = linear_weight(model.get_submodule(stats.name)).reshape(stats.shape[0], -1, 4)
        assert ((new != 0).sum(-1) <= 2).all() and ((new == 0).sum(-1) >= 2).all()
        kept_min = torch.where(new != 0, old.abs(), torch.inf).amin(-1)
        dropped_max = torch.where(new == 0, old.abs(), -torch.inf).amax(-1)
        assert (kept_min >= dropped_max).all()
    with pytest.raises(peftkit.errors.ConfigError, match="0 < n < m"):
        prune.nm_prune(tiny_llama(), 4, 4)
    with pytest.raises(peftkit.errors.ConfigError, match="divisible by 5"):
        prune.nm_prune(tiny_llama(), 2, 5)


def _zeroed_columns(model, pruned, names: list[str]) -> torch.nn.Module:
    """A copy of `model` whose `names` layers have the input columns the pruned model dropped set to 0:
    removing a head / channel must equal silencing it."""
    reference = copy.deepcopy(model)
    for name in names:
        full = linear_weight(reference.get_submodule(name))
        kept = linear_weight(pruned.get_submodule(name))
        keep = [j for j in range(full.shape[1]) if any(torch.equal(full[:, j], kept[:, i]) for i in range(kept.shape[1]))]
        mask = torch.zeros(full.shape[1], dtype=torch.bool)
        mask[keep] = True
        with torch.no_grad():
            full.mul_(mask)
    return reference


@pytest.mark.parametrize("builder,name,outputs", [
    (tiny_llama, "llama", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
    (tiny_bert, "bert", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"]),
])
def test_prune_heads_equals_silencing_them(builder, name, outputs, tmp_path):
    model = builder()
    pruned = copy.deepcopy(model)
    report = prune.prune_heads(pruned, 0.5)
    assert report.params_after < report.params_before and report.details["removed_per_block"] >= 1
    torch.testing.assert_close(logits(pruned, name), logits(_zeroed_columns(model, pruned, outputs), name),
                               atol=1e-5, rtol=1e-5)
    if name == "llama":  # GQA: whole key/value groups go; the config says so and reloads as is
        assert pruned.config.num_key_value_heads == 1 and pruned.config.num_attention_heads == 2
    prune.save_pruned(pruned, tmp_path, report)
    assert torch.equal(logits(prune.load_pruned(tmp_path), name), logits(pruned, name))
    if name == "llama":
        assert torch.equal(logits(type(pruned).from_pretrained(tmp_path), name), logits(pruned, name))


@pytest.mark.parametrize("builder,name", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_prune_channels_equals_silencing_them(builder, name, tmp_path):
    model = builder()
    pruned = copy.deepcopy(model)
    report = prune.prune_channels(pruned, count=16)
    downs = [s.name for s in report.layers if s.shape_before[1] != s.shape[1]]
    torch.testing.assert_close(logits(pruned, name), logits(_zeroed_columns(model, pruned, downs), name),
                               atol=1e-5, rtol=1e-5)
    assert (report.params_before, report.params_after) == (prune.count_params(model), prune.count_params(pruned))
    removed = sum(s.shape_before[0] * s.shape_before[1] - s.shape[0] * s.shape[1] for s in report.layers)
    assert removed <= report.params_before - report.params_after <= removed + 16 * len(report.layers)  # + biases
    prune.save_pruned(pruned, tmp_path, report)
    assert torch.equal(logits(prune.load_pruned(tmp_path), name), logits(pruned, name))
    assert torch.equal(logits(type(pruned).from_pretrained(tmp_path), name), logits(pruned, name))  # config updated


def test_structured_errors():
    with pytest.raises(peftkit.errors.TargetError, match="fused qkv"):
        prune.prune_heads(tiny_gpt2(), 0.5)
    with pytest.raises(peftkit.errors.ConfigError, match="exactly one"):
        prune.prune_channels(tiny_llama())
    with pytest.raises(peftkit.errors.ConfigError, match="can remove"):
        prune.prune_heads(tiny_bert(), count=4)
    with pytest.raises(peftkit.errors.TargetError, match="prune the full-precision model first"):
        prune.magnitude_prune(quantize(tiny_llama(), "nf4"), 0.5)


def test_unstructured_saves_as_a_plain_model_and_survives_quantization(tmp_path):
    model = tiny_llama()
    report = prune.magnitude_prune(model, 0.5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert prune.sparsity_report(reloaded).sparsity == report.sparsity
    quantize(reloaded, "nf4")  # zeros are exact in the 4-bit code books (w / absmax = 0 -> code 0)
    for stats in report.layers:
        deq = linear_weight(reloaded.get_submodule(stats.name))
        assert torch.equal(deq == 0, linear_weight(model.get_submodule(stats.name)) == 0)


@pytest.mark.parametrize("how", ["magnitude", "2:4", "channels"])
def test_lora_recovers_on_a_pruned_base_and_zeros_stay(how):
    model = tiny_bert()
    {"magnitude": lambda: prune.magnitude_prune(model, 0.5), "2:4": lambda: prune.nm_prune(model),
     "channels": lambda: prune.prune_channels(model, 0.25)}[how]()
    before = weights(model)
    tuned = peftkit.attach(model, peftkit.config("lora", targets="all-linear"))
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=2e-2)
    inputs = batch("bert")
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(tuned(**inputs))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with tuned.disabled():
        after = {n: linear_weight(m).detach() for n, m in tuned.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n in before}
    assert all(torch.equal(after[n], before[n]) for n in after)
