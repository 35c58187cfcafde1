"""TunedModel behaviour: several adapters, switching, weights, deletion, summary, generation,
gradient checkpointing, and the errors users meet."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import VOCAB, batch, output_tensor, tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit.core.host import Host


def logits(model, inputs, **kw):
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}, **kw))


def nudge(tuned, name, value):
    with torch.no_grad():
        for p in tuned.trainable_parameters(name):
            p.add_(value * torch.ones_like(p) if p.dim() < 2 else torch.randn_like(p) * value)


def two_adapters():
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", r=4), name="a")
    nudge(tuned, "a", 0.05)
    peftkit.attach(tuned, peftkit.config("lora", r=2, targets=["q_proj", "o_proj"]), name="b")
    nudge(tuned, "b", 0.05)
    return tuned


def test_attach_freezes_base_and_trains_only_the_new_adapter():
    tuned = two_adapters()
    assert tuned.adapters == ["a", "b"] and tuned.active_adapters == ("b",)
    trainable = {id(p) for p in tuned.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in tuned.trainable_parameters("b")}
    tuned.set_trainable("a")
    assert {id(p) for p in tuned.parameters() if p.requires_grad} == {id(p) for p in tuned.trainable_parameters("a")}


def test_switching_and_weighted_combination_are_linear_in_the_deltas():
    tuned = two_adapters()
    inputs = batch("llama")
    with tuned.disabled():
        base = logits(tuned, inputs)
    tuned.activate("a")
    only_a = logits(tuned, inputs)
    tuned.activate("b")
    only_b = logits(tuned, inputs)
    assert not torch.equal(only_a, only_b)
    tuned.activate(["a", "b"], weights=[1.0, 0.0])
    torch.testing.assert_close(logits(tuned, inputs), only_a, atol=1e-5, rtol=0)
    # A weighted combination of LoRA deltas at the first layer's projections is additive there;
    # check it at the level of one wrapped layer, where the map is exactly linear.
    host = tuned.model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        tuned.activate("a")
        da = host(x) - host.base_layer(x)
        tuned.activate("b")
        db = host(x) - host.base_layer(x)
        tuned.activate(["a", "b"], weights=[0.3, 0.7])
        torch.testing.assert_close(host(x) - host.base_layer(x), 0.3 * da + 0.7 * db, atol=1e-6, rtol=0)
    assert not torch.equal(logits(tuned, inputs), base)


def test_delete_and_detach_restore_the_original_modules():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: m for n, m in model.named_modules()}
    tuned = peftkit.attach(model, peftkit.config("lora"), name="a")
    peftkit.attach(tuned, peftkit.config("lora", targets=["o_proj"]), name="b")
    tuned.delete("b")
    assert tuned.adapters == ["a"]
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), Host)
    plain = tuned.detach()
    assert plain is model
    assert {n: m for n, m in plain.named_modules()} == modules
    assert all(torch.equal(original[k], v) for k, v in plain.state_dict().items())


def test_the_regularizer_follows_the_adapters_through_delete_and_reattach():
    """The regularising deltas are indexed when an adapter is installed: deleting it, or attaching another
    method under the same name, or a failed attach, leaves no stale term behind."""
    tuned = peftkit.attach(tiny_llama(), peftkit.config("adalora", total_steps=10), name="a")
    assert tuned.regularization_loss() is not None
    tuned.delete("a")
    peftkit.attach(tuned, peftkit.config("lora"), name="a")
    assert tuned.regularization_loss() is None
    tuned.delete("a")
    peftkit.attach(tuned, peftkit.config("adalora", total_steps=10), name="a")
    term = tuned.regularization_loss()
    assert term is not None and term.requires_grad
    with pytest.raises(peftkit.PeftkitError):
        peftkit.attach(tuned, peftkit.config("adalora", total_steps=10, targets=["no_such_layer"]), name="b")
    assert tuned.adapters == ["a"] and torch.equal(tuned.regularization_loss(), term)


def test_summary_counts_adapter_head_and_sites():
    tuned = peftkit.attach(tiny_bert(), peftkit.config("lora", r=4))
    s = tuned.summary()
    lora = 2 * 2 * (4 * 32 + 32 * 4)  # layers × (query, value) × (A + B)
    head = 32 * 2 + 2
    assert s.trainable == lora + head and s.head_trainable == head and s.trainable_without_head == lora
    assert s.base == sum(p.numel() for p in tiny_bert().parameters())
    assert len(s.rows) == 4 + 1 and {r.form for r in s.rows} == {"reparam", "select"}
    assert "trainable" in str(s) and "classifier" in str(s)
    assert peftkit.attach(tiny_bert(), peftkit.config("lora", trainable_modules=None)).summary().head_trainable == 0


def test_head_copy_trains_but_the_original_head_stays():
    model = tiny_bert()
    head = model.classifier.weight.detach().clone()
    tuned = peftkit.attach(model, peftkit.config("lora"))
    optimizer = torch.optim.SGD(tuned.trainable_parameters(), lr=0.5)
    loss = tuned(**batch("bert")).loss
    loss.backward()
    optimizer.step()
    assert torch.equal(tuned.model.classifier.base_layer.weight, head)
    copy = tuned.model.classifier.deltas["default"]["copy"].values["weight"]
    assert not torch.equal(copy, head)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_generate_passes_through_and_routes_per_sample(builder):
    tuned = peftkit.attach(builder(), peftkit.config("lora", r=4, init="random"), name="a")
    peftkit.attach(tuned, peftkit.config("lora", r=4, init="random"), name="b")
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = tuned.generate(input_ids=ids, adapter_names=["a", "b", None], **kw)
    rows = []
    for i, name in enumerate(["a", "b", None]):
        if name is None:
            with tuned.disabled():
                rows.append(tuned.generate(input_ids=ids[i:i + 1], **kw))
        else:
            tuned.activate(name)
            rows.append(tuned.generate(input_ids=ids[i:i + 1], **kw))
    assert torch.equal(mixed, torch.cat(rows))


def test_gradient_checkpointing_trains_the_adapter():
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", init="random"))
    tuned.gradient_checkpointing_enable()
    tuned.train()
    tuned(**batch("llama")).loss.backward()
    grads = [p.grad for p in tuned.trainable_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merge_returns_a_plain_model_and_keeps_outputs():
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", init="random"))
    inputs = batch("llama")
    expected = logits(tuned, inputs)
    plain = tuned.merge()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, Host) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=0)
    assert tuned.adapters == []


def test_merged_state_guards():
    tuned = two_adapters()
    tuned.activate("a")
    tuned.merge_adapter()
    assert tuned.merged_adapters == ("a",)
    with pytest.raises(peftkit.errors.AdapterStateError, match="unmerge"), tuned.disabled():
        pass
    with pytest.raises(peftkit.errors.AdapterStateError, match="unmerged"):
        logits(tuned, batch("llama"), adapter_names=["a", "b", None])
    with pytest.raises(peftkit.errors.AdapterStateError, match="unmerge"):
        tuned.delete("a")
    tuned.unmerge_adapter()
    assert tuned.merged_adapters == ()


def test_user_errors_are_clear():
    tuned = two_adapters()
    with pytest.raises(peftkit.errors.AdapterStateError, match="no adapter named 'c'"):
        tuned.activate("c")
    with pytest.raises(peftkit.errors.AdapterStateError, match="already exists"):
        peftkit.attach(tuned, peftkit.config("lora"), name="a")
    with pytest.raises(peftkit.errors.ConfigError, match="letters"):
        peftkit.attach(tuned, peftkit.config("lora"), name="has.dot")
    with pytest.raises(peftkit.errors.ConfigError, match="one weight per adapter"):
        tuned.activate(["a", "b"], weights=[1.0])
    with pytest.raises(peftkit.errors.AdapterStateError, match="one adapter name"):
        logits(tuned, batch("llama", batch_size=3), adapter_names=["a", "b"])
    with pytest.raises(peftkit.errors.AdapterStateError, match="no adapter named"):
        logits(tuned, batch("llama"), adapter_names=["a", "zzz", None])
    with pytest.raises(peftkit.errors.AdapterStateError, match="already a TunedModel"):
        peftkit.TunedModel(tuned)


def test_config_validation_and_registry():
    assert "lora" in peftkit.methods()
    with pytest.raises(peftkit.errors.ConfigError, match="Did you mean: alpha"):
        peftkit.config("lora", alpah=8)
    with pytest.raises(peftkit.errors.ConfigError, match="r must be a positive integer") as err:
        peftkit.config("lora", r=0, dropout=2.0)
    assert "dropout" in str(err.value)  # every problem reported at once
    with pytest.raises(peftkit.errors.ConfigError, match="Did you mean: lora"):
        peftkit.config("loraa")
    cfg = peftkit.config("lora", targets=["q_proj", "v_proj"], r=4)
    assert cfg.targets == ("q_proj", "v_proj")
    assert peftkit.config(cfg.to_dict()) == cfg
    assert cfg.replace(r=8).r == 8 and cfg.r == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 3


def test_rank_and_alpha_patterns():
    cfg = peftkit.config("lora", r=4, alpha=8, rank_pattern={"layers.0.self_attn.q_proj": 2},
                         alpha_pattern={"re:.*v_proj": 32}, rslora=True)
    tuned = peftkit.attach(tiny_llama(), cfg)
    q0 = tuned.model.get_submodule("model.layers.0.self_attn.q_proj").deltas["default"]["lora"]
    v1 = tuned.model.get_submodule("model.layers.1.self_attn.v_proj").deltas["default"]["lora"]
    assert q0.A.shape == (2, 32) and q0.scaling == pytest.approx(8 / 2 ** 0.5)
    assert v1.A.shape == (4, 32) and v1.scaling == pytest.approx(32 / 2)


def test_lora_on_conv1d_and_embedding_merges_exactly():
    tuned = peftkit.attach(tiny_gpt2(), peftkit.config("lora", targets=["c_attn", "c_fc", "wte"], init="random"))
    inputs = batch("gpt2")
    expected = logits(tuned, inputs)
    torch.testing.assert_close(logits(tuned.merge(), inputs), expected, atol=1e-5, rtol=0)


def test_reversible_merge_on_a_tied_embedding_keeps_the_tie():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    tuned = peftkit.attach(model, peftkit.config("lora", targets=["wte"], init="random"))
    inputs = batch("gpt2")
    expected = logits(tuned, inputs)
    tuned.merge_adapter()
    torch.testing.assert_close(logits(tuned, inputs), expected, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        plain = tuned.merge()
    assert plain.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=0)


def test_dora_matches_its_formula():
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", dora=True, init="random", r=4))
    host = tuned.model.get_submodule("model.layers.0.self_attn.v_proj")
    delta = host.deltas["default"]["lora"]
    with torch.no_grad():
        delta.magnitude.mul_(1.5)
        x = torch.randn(2, 3, 32)
        w = host.base_layer.weight + delta.scaling * delta.B @ delta.A
        expected = x @ (delta.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(host(x), expected, atol=1e-5, rtol=1e-5)


def state_of(tuned):
    """Everything an operation may change: weights, flags, active set and merged adapters."""
    return ({k: v.clone() for k, v in tuned.state_dict().items()}, {k: p.requires_grad for k, p in tuned.named_parameters()},
            tuned.active_adapters, tuned.adapter_weights, tuned.merged_adapters, tuned.adapters)


def assert_same(before, after):
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


@pytest.mark.parametrize("operation", ["merge_adapter", "merge"])
def test_a_failed_merge_changes_nothing(operation):
    """A merge that produces NaN at its second site is rolled back at the first too."""
    tuned = two_adapters()
    tuned.activate(["a", "b"])
    sites = [s for s, h in tuned.named_modules() if isinstance(h, Host) and "b" in h.deltas]
    with torch.no_grad():  # finite outputs, but a weight that overflows when folded
        tuned.get_submodule(sites[-1]).deltas["b"]["lora"].B.fill_(3e38)
        tuned.get_submodule(sites[-1]).deltas["b"]["lora"].A.fill_(3e38)
    before = state_of(tuned)
    with pytest.raises(peftkit.errors.AdapterStateError, match="NaN/inf"):
        getattr(tuned, operation)()
    assert_same(before, state_of(tuned))


def test_merge_never_drops_an_attached_adapter_silently():
    tuned = two_adapters()  # "b", attached last, is the active one; "a" is trained too
    before = state_of(tuned)
    with pytest.raises(peftkit.errors.AdapterStateError, match=r"\['a'\].*would be lost"):
        tuned.merge()
    assert_same(before, state_of(tuned))
    plain = tuned.merge(["a", "b"])
    assert not any(isinstance(m, Host) for m in plain.modules())


def test_not_a_model_or_a_merged_delete_is_a_clear_error():
    with pytest.raises(peftkit.errors.ConfigError, match="PyTorch model"):
        peftkit.attach("path/to/model", peftkit.config("lora"))
    assert peftkit.attach(tiny_llama(), "lora").config_of("default").method == "lora"  # a name works too
    tuned = two_adapters()
    tuned.activate("b")
    tuned.merge_adapter()
    before = state_of(tuned)
    with pytest.raises(peftkit.errors.AdapterStateError, match="merged"):
        tuned.delete("b")
    assert_same(before, state_of(tuned))


def test_a_multi_adapter_load_is_all_or_nothing(tmp_path):
    two_adapters().save(tmp_path / "both")
    (tmp_path / "both" / "b" / "adapter.safetensors").write_bytes(b"damaged")
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", r=2), name="mine")
    before = state_of(tuned)
    with pytest.raises(peftkit.errors.AdapterFileError):
        peftkit.load(tuned, tmp_path / "both")
    assert_same(before, state_of(tuned))
