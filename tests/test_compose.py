"""Composition: several methods in one adapter, optionally gated. The contract suite runs the
compose variants of cases.py through the shared invariants; these tests add what is specific."""

from __future__ import annotations

import pytest
import torch
import yaml
from models import BUILDERS, batch, output_tensor

import peftkit
from peftkit.core.host import Host
from peftkit.methods.hybrid.gate import GatedDelta

THREE = [{"method": "lora", "r": 4}, {"method": "bitfit"}, {"method": "ln_tuning"}]


def _run(model, inputs, **kw):
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}, **kw))


def _train(tuned, inputs, steps=8, lr=1e-2):
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = tuned(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tuned.eval()
    return losses


def test_config_from_dicts_yaml_and_objects_agree():
    as_objects = peftkit.config("compose", parts=[peftkit.config(p["method"], **{k: v for k, v in p.items()
                                                                                if k != "method"}) for p in THREE])
    text = "method: compose\nparts:\n  - {method: lora, r: 4}\n  - {method: bitfit}\n  - {method: ln_tuning}\n"
    from_yaml = peftkit.config(yaml.safe_load(text))
    assert as_objects == from_yaml == peftkit.config("compose", parts=THREE)
    assert peftkit.config(from_yaml.to_dict()) == from_yaml
    with pytest.raises(peftkit.errors.ConfigError, match="part 1"):
        peftkit.config("compose", parts=[{"method": "lora"}, {"method": "lorra"}])
    with pytest.raises(peftkit.errors.ConfigError, match="one bool per part"):
        peftkit.config("compose", parts=THREE, gates=[True])


def test_three_methods_train_save_load_and_route(tmp_path):
    inputs = batch("bert", batch_size=4)
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("compose", parts=THREE), name="a")
    slots = {prefix.rsplit(".", 1)[1] for prefix, _ in tuned.deltas("a")}
    assert {"lora", "bias", "ln", "copy"} <= slots
    frozen = {k: v.clone() for k, v in tuned.model.state_dict().items() if "deltas" not in k}
    losses = _train(tuned, inputs)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, tuned.model.state_dict()[k]) for k, v in frozen.items()), "a base tensor changed"
    expected = _run(tuned, inputs)
    tuned.save(tmp_path / "a")
    loaded = peftkit.load(BUILDERS["bert"](), tmp_path / "a")
    assert torch.equal(_run(loaded, inputs), expected)

    peftkit.attach(loaded, peftkit.config("compose", parts=THREE), name="b")
    with torch.no_grad():
        for p in loaded.trainable_parameters("b"):
            p.add_(torch.randn_like(p) * 0.05)
    mixed = _run(loaded, inputs, adapter_names=["a", "b", None, "a"])
    loaded.activate("b")
    only_b = _run(loaded, inputs)
    with loaded.disabled():
        bare = _run(loaded, inputs)
    torch.testing.assert_close(mixed, torch.stack([expected[0], only_b[1], bare[2], expected[3]]), atol=1e-5, rtol=1e-5)

    plain = loaded.merge("a")
    torch.testing.assert_close(_run(plain, inputs), expected, atol=1e-5, rtol=0)


def test_overlapping_select_parts_are_refused():
    config = peftkit.config("compose", parts=[{"method": "ln_tuning"}, {"method": "layer_tuning"}])
    with pytest.raises(peftkit.errors.ConfigError, match="both tune parameter"):
        peftkit.attach(BUILDERS["bert"](), config)


def test_gates_start_at_half_learn_and_keep_identity():
    inputs = batch("bert")
    reference = _run(BUILDERS["bert"](), inputs)
    config = peftkit.config("compose", parts=[{"method": "lora", "r": 4}, {"method": "bitfit"}], gates=[True, False])
    tuned = peftkit.attach(BUILDERS["bert"](), config)
    gated = [d for _, d in tuned.deltas("default") if isinstance(d, GatedDelta)]
    assert gated and all(d.form == "reparam+gate" for d in gated)
    torch.testing.assert_close(_run(tuned, inputs), reference, atol=1e-6, rtol=0)  # LoRA's B = 0: still identity
    x = torch.randn(3, 5, 32)
    assert torch.equal(gated[0].gate("contribution", x), torch.full((3, 5, 1), 0.5))
    _train(tuned, inputs, steps=4)
    assert not torch.equal(gated[0].gate("contribution", x), torch.full((3, 5, 1), 0.5))
    torch.testing.assert_close(gated[0].gate("contribution", 50 * x), gated[0].gate("contribution", x))  # scale-free
    with pytest.raises(peftkit.errors.NotMergeableError):
        tuned.merge_adapter()


def test_gating_a_select_part_is_an_error():
    config = peftkit.config("compose", parts=[{"method": "lora"}, {"method": "ln_tuning"}], gates=True)
    with pytest.raises(peftkit.errors.ConfigError, match="part 1 .ln_tuning. has no delta that can be gated"):
        peftkit.attach(BUILDERS["bert"](), config)


def test_mam_is_prefix_plus_scaled_parallel_adapter():
    from peftkit.methods.additive.parallel_adapter import ParallelAdapter

    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("mam"))
    parts = tuned.config_of("default").parts(tuned.model).parts
    assert [p.method for p in parts] == ["prefix_tuning", "parallel_adapter"]
    assert parts[0].num_virtual_tokens == 30 and parts[0].reparam_hidden == 25  # 800 · 32/1024
    adapters = [d for _, d in tuned.deltas("default") if isinstance(d, ParallelAdapter)]
    assert len(adapters) == 2 and all(a.net.down.weight.shape[0] == 16 and a.scale == 4.0 for a in adapters)
    assert "default" in tuned.model_deltas
    with pytest.raises(peftkit.errors.NotMergeableError):
        tuned.merge_adapter()


def test_unipelt_gates_lora_and_adapter_trains_saves_loads(tmp_path):
    inputs = batch("bert")
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("unipelt", bottleneck=8, prefix_length=4))
    gated = {d.inner.form for _, d in tuned.deltas("default") if isinstance(d, GatedDelta)}
    assert gated == {"reparam", "sequential"}  # LoRA on q/v and the FFN adapter; the prefix is not gateable
    assert "default" in tuned.model_deltas
    losses = _train(tuned, inputs, steps=6)
    assert losses[-1] < losses[0]
    expected = _run(tuned, inputs)
    tuned.save(tmp_path / "u")
    loaded = peftkit.load(BUILDERS["bert"](), tmp_path / "u")
    assert torch.equal(_run(loaded, inputs), expected)
    with pytest.raises(peftkit.errors.AdapterStateError, match="mixed-adapter"):
        _run(loaded, batch("bert", batch_size=2), adapter_names=["default", None])


def test_parts_prepare_the_base_qlora_in_a_composition():
    from peftkit.core.linear import is_quantized

    config = peftkit.config("compose", parts=[{"method": "qlora", "r": 2}, {"method": "ln_tuning"}])
    tuned = peftkit.attach(BUILDERS["llama"](), config)
    assert any(is_quantized(h.base_layer) for h in tuned.modules() if isinstance(h, Host))
    assert tuned(**batch("llama")).loss.isfinite()
