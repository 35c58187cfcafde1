"""The contract every method keeps, on every model it supports (see cases.py)."""

from __future__ import annotations

import pytest
import torch
from cases import contract_cases
from models import BUILDERS, batch, loss_of, output_tensor

import peftkit
from peftkit.core.host import Host
from peftkit.core.registry import get as get_spec

CASES = contract_cases()


def make(method: str, model_name: str, options: dict, name: str = "default", tuned=None):
    model = tuned if tuned is not None else BUILDERS[model_name]()
    return peftkit.attach(model, peftkit.config(method, **options), name=name)


def perturb(tuned: peftkit.TunedModel, name: str, seed: int) -> None:
    """Move an adapter away from its init so that exactness checks are not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters(name):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)


def run(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}, **kw))


def base_state(tuned: peftkit.TunedModel) -> dict[str, torch.Tensor]:
    delta_ids = {id(p) for n in tuned.adapters for _, d in tuned.deltas(n) for p in d.parameters()}
    return {k: p.detach().clone() for k, p in tuned.named_parameters() if id(p) not in delta_ids}


@pytest.mark.parametrize("method,model_name,options", CASES)
def test_identity_at_init(method, model_name, options):
    if not get_spec(method).identity_at_init:
        pytest.skip(f"{method} does not promise identity at init")  # a documented property, not a failure
    inputs = batch(model_name)
    reference = run(BUILDERS[model_name](), inputs)
    tuned = make(method, model_name, options)
    torch.testing.assert_close(run(tuned, inputs), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,model_name,options", CASES)
def test_training_touches_only_adapter(method, model_name, options):
    tuned = make(method, model_name, options)
    perturb(tuned, "default", seed=3)
    before = base_state(tuned)
    trainable = {id(p) for p in tuned.trainable_parameters()}
    assert trainable, "the adapter has no trainable parameters"
    assert trainable == {id(p) for p in tuned.trainable_parameters("default")}
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    inputs = batch(model_name)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_of(tuned(**inputs))
        loss.backward()
        with_grad = {id(p) for p in tuned.parameters() if p.grad is not None}
        assert with_grad <= trainable, "a frozen parameter received a gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    after = base_state(tuned)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"base tensor {key} changed"


@pytest.mark.parametrize("method,model_name,options", CASES)
def test_disabled_is_exact_base(method, model_name, options):
    inputs = batch(model_name)
    reference = run(BUILDERS[model_name](), inputs)
    tuned = make(method, model_name, options)
    perturb(tuned, "default", seed=4)
    with tuned.disabled():
        assert torch.equal(run(tuned, inputs), reference)
    assert not torch.equal(run(tuned, inputs), reference)


@pytest.mark.parametrize("method,model_name,options", CASES)
@pytest.mark.parametrize("fmt", ["peftkit", "hf-peft"])
def test_save_load_exact(method, model_name, options, fmt, tmp_path):
    if fmt == "hf-peft" and get_spec(method).hf is None:
        with pytest.raises(peftkit.errors.AdapterFileError):
            make(method, model_name, options).save(tmp_path / "a", format=fmt)
        return
    if fmt == "hf-peft" and method in ("prefix_tuning", "prompt_tuning", "p_tuning") and model_name == "bert":
        options = {**options, "shift_positions": True}  # PEFT's layout; the unshifted default is refused (interop tests)
    inputs = batch(model_name)
    tuned = make(method, model_name, options)
    perturb(tuned, "default", seed=5)
    expected = run(tuned, inputs)
    tuned.save(tmp_path / "a", format=fmt)
    loaded = peftkit.load(BUILDERS[model_name](), tmp_path / "a")
    assert torch.equal(run(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "trainable=False must freeze the adapter"


@pytest.mark.parametrize("method,model_name,options", CASES)
def test_merge_unmerge(method, model_name, options):
    inputs = batch(model_name)
    tuned = make(method, model_name, options)
    perturb(tuned, "default", seed=6)
    before = base_state(tuned)
    expected = run(tuned, inputs)
    try:
        tuned.merge_adapter()
    except peftkit.errors.NotMergeableError:
        assert all(torch.equal(v, base_state(tuned)[k]) for k, v in before.items()), "a refused merge changed weights"
        return
    torch.testing.assert_close(run(tuned, inputs), expected, atol=1e-5, rtol=0)
    tuned.unmerge_adapter()
    after = base_state(tuned)
    assert all(torch.equal(before[k], after[k]) for k in before), "unmerge did not restore the base exactly"
    assert torch.equal(run(tuned, inputs), expected)
    plain = tuned.merge()
    assert not any(isinstance(m, Host) for m in plain.modules())
    assert not any("delta" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(run(plain, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,model_name,options", CASES)
def test_mixed_adapter_batch(method, model_name, options):
    tuned = make(method, model_name, options, name="a")
    make(method, model_name, options, name="b", tuned=tuned)
    perturb(tuned, "a", seed=7)
    perturb(tuned, "b", seed=8)
    inputs = batch(model_name, batch_size=4)
    routing = ["a", "b", None, "a"]
    if "a" in tuned.model_deltas:  # virtual tokens / prefixes cannot be routed per sample
        with pytest.raises(peftkit.errors.AdapterStateError):
            run(tuned, inputs, adapter_names=routing)
        return
    mixed = run(tuned, inputs, adapter_names=routing)
    expected = []
    for row, name in enumerate(routing):
        if name is None:
            with tuned.disabled():
                full = run(tuned, inputs)
        else:
            tuned.activate(name)
            full = run(tuned, inputs)
        expected.append(full[row])
    torch.testing.assert_close(mixed, torch.stack(expected), atol=1e-5, rtol=1e-5)
