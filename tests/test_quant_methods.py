"""Methods on a quantized base: every registered method attaches and trains (or refuses clearly), the
qlora recipe keeps the contract relative to its quantized base, and merging never changes outputs silently."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import batch, loss_of, output_tensor, tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit.core.host import Host
from peftkit.quant import QuantizedMergeWarning, QuantLinear, base_quantization, quantize, quantized_layers

# Options a method needs to attach at all on the tiny models.
OPTIONS = {"adalora": {"total_steps": 20}, "compose": {"parts": [{"method": "lora"}, {"method": "ia3"}]}}
# Methods that cannot run on a quantized (bias-free) Llama base, and must say so with a PeftkitError.
REFUSES = {
    "bitfit": "no bias term",  # Llama has no biases at all (a data fact, not a quantization one)
    "layer_tuning": "quantized",  # trains full weight copies, and quantized weights are frozen storage
    "full": "quantized",  # the same, for every weight
    "head_only": "no task head|has none",  # a causal LM has no task head to train
}


def storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{site}.{k}": b.clone() for site, m in quantized_layers(model).items()
            for k, b in m.named_buffers(recurse=False)}


def perturb(tuned: peftkit.TunedModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}))


@pytest.mark.parametrize("method", peftkit.methods())
def test_every_method_trains_on_a_quantized_base(method):
    model = quantize(tiny_llama(), "nf4")
    before = storage(model)
    config = peftkit.config(method, **OPTIONS.get(method, {}))
    if method in REFUSES:
        with pytest.raises(peftkit.PeftkitError, match=REFUSES[method]):
            peftkit.attach(model, config)
        return
    tuned = peftkit.attach(model, config)
    inputs = batch("llama")
    if tuned.needs_calibration:
        tuned.calibrate([inputs])
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=2e-2)
    tuned.train()
    losses = []
    for step in range(10):
        optimizer.zero_grad()
        loss = loss_of(tuned(**inputs))
        loss.backward()
        optimizer.step()
        tuned.update(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{method}: loss did not fall on a quantized base: {losses}"
    after = storage(tuned.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["bitfit", "ia3", "lora"])
def test_methods_train_on_quantized_bert_biases_included(method):
    model = quantize(tiny_bert(), "int8")
    tuned = peftkit.attach(model, peftkit.config(method))
    inputs = batch("bert")
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=2e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = tuned(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -- the qlora recipe: the contract, relative to the quantized base --------------------------------
@pytest.mark.parametrize("builder,name", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_qlora_quantizes_on_attach_and_keeps_the_contract(builder, name, tmp_path):
    inputs = batch(name)
    reference = run(quantize(builder(), "nf4"), inputs)  # the base qlora trains on
    tuned = peftkit.attach(builder(), peftkit.config("qlora"))
    plain = [n for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear) and "lora" not in n
             and "classifier" not in n and "lm_head" not in n]
    assert not plain, f"left in full precision: {plain}"
    assert torch.equal(run(tuned, inputs), reference)  # identity at init
    assert {tuned.config_of("default").targets} == {"all-linear"}
    perturb(tuned)
    with tuned.disabled():
        assert torch.equal(run(tuned, inputs), reference)
    expected = run(tuned, inputs)
    assert not torch.equal(expected, reference)
    tuned.save(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter.json").read_text())["config"]
    assert saved["quant_type"] == "nf4" and saved["double_quant"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "base not bit-identical": it is fp32 until qlora quantizes it
        loaded = peftkit.load(builder(), tmp_path / "a")  # a full-precision base: quantized on load
    assert torch.equal(run(loaded, inputs), expected)
    loaded_again = peftkit.load(quantize(builder(), "nf4"), tmp_path / "a")  # already quantized: no warning
    assert torch.equal(run(loaded_again, inputs), expected)


def test_qlora_options_hf_format_and_direct_build(tmp_path):
    tuned = peftkit.attach(tiny_llama(), peftkit.config("qlora", r=4, quant_type="fp4", double_quant=False,
                                                        targets=["q_proj", "v_proj"]))
    layers = [m for m in tuned.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {(m.spec.scheme, m.spec.double_quant) for m in layers} == {("fp4", False)}
    assert len(tuned.sites("default")) == 4  # LoRA where asked; the whole base quantized regardless
    perturb(tuned)
    tuned.save(tmp_path / "hf", format="hf-peft")
    hf = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert hf["peft_type"] == "LORA" and hf["r"] == 4
    reloaded = peftkit.load(quantize(tiny_llama(), "fp4", double_quant=False), tmp_path / "hf")
    assert reloaded.config_of("default").method == "lora"  # a PEFT LORA file reads back as lora
    inputs = batch("llama")
    assert torch.equal(run(reloaded, inputs), run(tuned, inputs))
    with pytest.raises(peftkit.errors.ConfigError, match="quant_type|scheme"):
        peftkit.config("qlora", quant_type="nf2")
    with pytest.raises(peftkit.errors.ConfigError, match="needs a quantized base"):
        peftkit.config("qlora").__class__  # noqa: B018 - config is fine; building without prepare is not
        from peftkit.core.registry import get

        get("qlora").build(tiny_llama(), peftkit.config("qlora"))


def test_base_quantization_for_runs():
    assert base_quantization(peftkit.config("lora")) is None
    assert base_quantization(peftkit.config("lora"), "int8") == {"scheme": "int8"}
    declared = base_quantization(peftkit.config("qlora", blocksize=128))
    assert declared["scheme"] == "nf4" and declared["blocksize"] == 128 and declared["double_quant"] is True
    assert base_quantization(peftkit.config("qlora"), "fp4")["scheme"] == "fp4"


def test_summary_counts_quantized_weights():
    fp32 = peftkit.attach(tiny_llama(), peftkit.config("lora", targets="all-linear")).summary()
    q = peftkit.attach(quantize(tiny_llama(), "nf4"), peftkit.config("lora", targets="all-linear")).summary()
    assert (q.total, q.base, q.trainable) == (fp32.total, fp32.base, fp32.trainable)


# -- merging into a quantized base ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3", "qlora"])
def test_merge_requantizes_and_reports_the_error(method):
    inputs = batch("llama")
    tuned = peftkit.attach(quantize(tiny_llama(), "nf4"), peftkit.config(method))
    perturb(tuned)
    expected = run(tuned, inputs)
    with pytest.warns(QuantizedMergeWarning, match="re-quantized") as caught:
        merged = tuned.merge()
    errors = tuned.requantization_errors
    assert errors and all(0 < e < 0.5 for e in errors.values())
    assert f"{max(errors.values()):.3g}" in str(caught[0].message)
    assert any(isinstance(m, QuantLinear) for m in merged.modules())  # still small
    assert not any(isinstance(m, Host) for m in merged.modules())
    change = (run(merged, inputs) - expected).abs().max()
    assert 0 < change < 0.2 * expected.abs().max()  # moved by quantization error, not more


@pytest.mark.parametrize("builder,name", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")])
def test_merge_into_full_precision_copy_is_exact(builder, name):
    inputs = batch(name)
    tuned = peftkit.attach(builder(), peftkit.config("qlora", dora=name == "llama"))
    perturb(tuned)
    expected = run(tuned, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedMergeWarning)
        merged = tuned.merge(dequantize=True)
    assert not any(isinstance(m, QuantLinear | Host) for m in merged.modules())
    torch.testing.assert_close(run(merged, inputs), expected, atol=1e-5, rtol=0)


def test_merge_adapter_and_unmerge_restore_storage_exactly():
    inputs = batch("bert")
    tuned = peftkit.attach(quantize(tiny_bert(), "nf4"), peftkit.config("lora", bias="all"))
    perturb(tuned)
    before, expected = storage(tuned.model), run(tuned, inputs)
    with pytest.warns(QuantizedMergeWarning):
        tuned.merge_adapter()
    assert not all(torch.equal(before[k], v) for k, v in storage(tuned.model).items())
    tuned.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in storage(tuned.model).items())
    assert torch.equal(run(tuned, inputs), expected) and tuned.requantization_errors


def test_bias_only_merge_leaves_quantized_weights_alone():
    inputs = batch("bert")
    tuned = peftkit.attach(quantize(tiny_bert(), "nf4"), peftkit.config("bitfit"))
    perturb(tuned)
    before, expected = storage(tuned.model), run(tuned, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedMergeWarning)
        merged = tuned.merge()
    assert all(torch.equal(before[k], v) for k, v in storage(merged).items())
    torch.testing.assert_close(run(merged, inputs), expected, atol=1e-5, rtol=0)
