"""AdaLoRA: budget schedule, masking, orthogonality, pruned files, conversion to LoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import batch, tiny_bert
from safetensors import safe_open

import peftkit
from peftkit.methods.reparameterized.adalora import (
    AdaLoraLinear,
    convert_to_lora,
    parameter_count,
    rank_pattern,
)
from peftkit.methods.reparameterized.adalora_budget import budget_at


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run 10-50x faster on one thread when the 2 shared cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


OPTIONS = {"init_r": 4, "target_r": 1.5, "total_steps": 12, "t_init": 2, "t_final": 3, "delta_t": 2}


def train(tuned: peftkit.TunedModel, steps: int, lr: float = 1e-2, start: int = 0, optimizer=None) -> list[int]:
    """A plain loop with the documented call order; returns the kept ranks after each update."""
    inputs = batch("bert", batch_size=4)
    optimizer = optimizer or torch.optim.AdamW(tuned.trainable_parameters(), lr=lr)
    tuned.train()
    kept = []
    for step in range(start, steps):  # step: 0-based index of the optimizer step
        tuned(**inputs).loss.backward()
        optimizer.step()
        tuned.update(step)
        optimizer.zero_grad()
        kept.append(sum(rank_pattern(tuned).values()))
    tuned.eval()
    return kept


def adalora(**options) -> peftkit.TunedModel:
    return peftkit.attach(tiny_bert(), peftkit.config("adalora", **{**OPTIONS, **options}))


def logits(model, inputs=None) -> torch.Tensor:
    inputs = inputs or batch("bert", batch_size=4, seed=9)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def test_schedule_hits_start_and_end_and_is_cubic():
    initial, target, t_init, t_final, total = 120, 30, 10, 20, 110
    span = total - t_final - t_init
    for step in range(0, t_init + 1):
        assert budget_at(step, initial, target, t_init, t_final, total) == initial
    for step in range(total - t_final, total + 5):
        assert budget_at(step, initial, target, t_init, t_final, total) == target
    for step in range(t_init + 1, total - t_final):
        u = 1 - (step - t_init) / span
        got = budget_at(step, initial, target, t_init, t_final, total)
        assert got == int(target + (initial - target) * u**3)
        assert target <= got <= initial
    # cubic, not linear: at the midpoint only an eighth of the removable ranks remain
    assert budget_at(t_init + span // 2, initial, target, t_init, t_final, total) == target + (initial - target) // 8


def test_masked_singular_values_per_update_and_exact_final_budget():
    tuned = adalora()
    sites = len(rank_pattern(tuned))
    initial, target = 4 * sites, round(1.5 * sites)
    kept = train(tuned, OPTIONS["total_steps"])
    allocator = tuned.controller("default")
    expected_steps = [s for s in range(3, 9) if s % 2 == 0] + [9]  # every delta_t after t_init, then the final
    assert [h[0] for h in allocator.history] == expected_steps
    for step, budget, count in allocator.history:
        assert budget == budget_at(step, initial, target, 2, 3, 12)
        assert count == budget, "each update keeps exactly the scheduled budget"
        assert initial - kept[step - 1] == initial - budget_at(step, initial, target, 2, 3, 12)  # masked per update
    assert kept[:2] == [initial, initial], "nothing is masked during t_init"
    assert kept[-4:] == [target] * 4, "the final budget is exact and fixed for the last t_final steps"
    for _, delta in tuned.deltas("default"):
        if isinstance(delta, AdaLoraLinear):
            assert torch.all(delta.E[~delta.mask] == 0), "masked singular values are zero after update()"


def test_budget_option_and_rank_reallocation_is_uneven():
    tuned = adalora(budget=5, target_r=8)  # with a budget, target_r (here > init_r) is ignored
    train(tuned, OPTIONS["total_steps"], lr=3e-2)
    ranks = rank_pattern(tuned)
    assert sum(ranks.values()) == 5
    assert parameter_count(tuned) == sum(k * (32 + 32 + 1) for k in ranks.values())


def test_orthogonality_term_falls_during_training():
    tuned = adalora(orth_reg=1.0, total_steps=40)
    before = tuned.regularization_loss().item()
    train(tuned, 30, lr=1e-2)
    after = tuned.regularization_loss().item()
    assert after < 0.5 * before, (before, after)
    tuned.train()  # the term is part of outputs.loss while training
    inputs = batch("bert")
    with_reg = tuned(**inputs).loss
    tuned.eval()
    assert with_reg.item() == pytest.approx(tuned(**inputs).loss.item() + tuned.regularization_loss().item(), rel=1e-5)


def test_pruned_file_loads_exactly(tmp_path):
    tuned = adalora()
    train(tuned, OPTIONS["total_steps"])
    expected = logits(tuned)
    tuned.save(tmp_path / "a")
    ranks = rank_pattern(tuned)
    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        for site, k in ranks.items():
            assert f.get_slice(f"{site}.adalora.A").get_shape() == [k, 32]
            assert f.get_slice(f"{site}.adalora.E").get_shape() == [k]
            assert f.get_tensor(f"{site}.adalora.mask").sum().item() == k
    loaded = peftkit.load(tiny_bert(), tmp_path / "a")
    assert rank_pattern(loaded) == ranks
    assert torch.equal(logits(loaded), expected)
    with pytest.raises(peftkit.errors.AdapterFileError):  # a file whose mask disagrees with its tensors is refused
        state = loaded.adapter_state("default")
        site = next(iter(ranks))
        state[f"{site}.adalora.mask"] = torch.ones(4, dtype=torch.bool)
        loaded.load_adapter_state("default", state)


def test_file_before_final_allocation_keeps_all_ranks(tmp_path):
    tuned = adalora()
    train(tuned, 6)  # masks set at n = 4 and 6, not yet final
    assert sum(rank_pattern(tuned).values()) < 16
    tuned.save(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_shape()[0] == 4 for k in f.keys() if k.endswith(".adalora.A"))  # noqa: SIM118 - not a dict
    loaded = peftkit.load(tiny_bert(), tmp_path / "a")
    assert torch.equal(logits(loaded), logits(tuned))


@pytest.mark.parametrize("stop", [5, 10], ids=["budget-phase", "final-phase"])
def test_resume_from_saved_adapter_and_controller_state_is_exact(tmp_path, stop):
    reference = adalora()
    optimizer = torch.optim.AdamW(reference.trainable_parameters(), lr=1e-2)
    train(reference, stop, optimizer=optimizer)
    reference.save(tmp_path / "a")
    opt_state = copy.deepcopy(optimizer.state_dict())  # what a checkpoint holds
    ctl_state = copy.deepcopy(reference.controller("default").state_dict())
    train(reference, 12, start=stop, optimizer=optimizer)
    resumed = peftkit.load(tiny_bert(), tmp_path / "a", trainable=True)
    optimizer = torch.optim.AdamW(resumed.trainable_parameters(), lr=1e-2)
    optimizer.load_state_dict(opt_state)
    resumed.controller("default").load_state_dict(ctl_state)
    train(resumed, 12, start=stop, optimizer=optimizer)
    assert rank_pattern(resumed) == rank_pattern(reference)
    assert torch.equal(logits(resumed), logits(reference))


def test_convert_to_lora_same_outputs_smaller_file_mergeable(tmp_path):
    tuned = adalora()
    train(tuned, OPTIONS["total_steps"])
    ranks = rank_pattern(tuned)
    expected = logits(tuned)
    tuned.save(tmp_path / "adalora")
    convert_to_lora(tuned)
    assert tuned.adapters == ["default"] and tuned.config_of("default").method == "lora"
    torch.testing.assert_close(logits(tuned), expected, atol=1e-5, rtol=0)
    tuned.save(tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / "adapter.json").read_text())
    kept = {s: k for s, k in ranks.items() if k}
    assert meta["config"]["targets"] == list(kept)
    assert {s: tuned.config_of("default").rank_alpha(s)[0] for s in kept} == kept
    size = lambda p: (p / "adapter.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "lora") < size(tmp_path / "adalora")
    reloaded = peftkit.load(tiny_bert(), tmp_path / "lora")
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    merged = reloaded.merge()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_convert_beside_keeps_adalora_and_rejects_other_methods():
    tuned = adalora()
    train(tuned, OPTIONS["total_steps"])
    convert_to_lora(tuned, new_name="plain")
    assert tuned.adapters == ["default", "plain"] and tuned.active_adapters == ("default",)
    expected = logits(tuned)
    tuned.activate("plain")
    torch.testing.assert_close(logits(tuned), expected, atol=1e-5, rtol=0)
    with pytest.raises(peftkit.errors.ConfigError, match="adalora"):
        convert_to_lora(tuned, "plain")


def test_update_contract_and_errors():
    with pytest.raises(peftkit.errors.ConfigError, match="total_steps"):
        peftkit.config("adalora")
    with pytest.raises(peftkit.errors.ConfigError, match="budgeting phase"):
        peftkit.config("adalora", total_steps=10, t_init=5, t_final=5)
    with pytest.raises(peftkit.errors.ConfigError, match="exceeds"):
        adalora(budget=100)
    tuned = adalora()
    tuned.set_trainable(None)  # a frozen adapter is not reallocated
    for step in range(12):
        tuned.update(step)
    assert sum(rank_pattern(tuned).values()) == 4 * 4
    tuned.set_trainable("default")
    with pytest.raises(peftkit.errors.ConfigError, match="optimizer step"):
        tuned.update(-1)


def test_driven_by_transformers_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peftkit.train import PeftkitCallback

    tuned = adalora()
    inputs = batch("bert", batch_size=4)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_strategy="no", lr_scheduler_type="constant", disable_tqdm=True,
                                          remove_unused_columns=False)
    trainer = transformers.Trainer(model=tuned, args=args, train_dataset=rows, callbacks=[PeftkitCallback()])
    trainer.train()
    allocator = tuned.controller("default")
    assert [h[0] for h in allocator.history] == [4, 6, 8, 9]  # same schedule as the plain loop
    assert sum(rank_pattern(tuned).values()) == round(1.5 * 4)


def test_driven_by_peftkit_trainer(tmp_path):
    from peftkit.train import TrainConfig, Trainer
    from peftkit.train.data import Encoded, Prepared

    tuned = adalora()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(8)]
    data = Prepared("classification", Encoded.from_lists(seqs, [i % 2 for i in range(8)], per_token=False), None)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup=0, schedule="constant", progress=False).resolved()
    Trainer(tuned, data, cfg, out=tmp_path, pad_id=0).fit()
    allocator = tuned.controller("default")
    assert [h[0] for h in allocator.history] == [4, 6, 8, 9]
    assert sum(rank_pattern(tuned).values()) == round(1.5 * 4)
    assert (tmp_path / "checkpoint").is_dir() and any((tmp_path / "checkpoint").glob("controller.*"))
