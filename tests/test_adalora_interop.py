"""AdaLoRA files shared with the real `peft` package, both directions, pruned rank patterns included."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch, tiny_gpt2, tiny_llama

import peftkit
from peftkit.methods.reparameterized.adalora import rank_pattern

peft = pytest.importorskip("peft")
# peft 0.21 warns so when it loads its own pruned AdaLoRA files too (it checks the keys as LoRA rank patterns).
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")

STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def logits(model) -> torch.Tensor:
    inputs = batch("llama", batch_size=2, seed=4)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def train(model, params, after_step) -> None:
    torch.manual_seed(0)
    inputs = batch("llama", batch_size=4)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for step in range(1, STEPS + 1):
        model(**inputs).loss.backward()
        optimizer.step()
        after_step(step)
        optimizer.zero_grad()
    model.eval()


def test_peft_adalora_file_loads_in_peftkit(tmp_path):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=STEPS, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(), config)
    train(model, [p for p in model.parameters() if p.requires_grad], model.base_model.update_and_allocate)
    expected = logits(model)
    model.save_pretrained(str(tmp_path))
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and any(not all(v) for v in pattern.values()), "peft should have pruned some ranks"
    tuned = peftkit.load(tiny_llama(), tmp_path)
    assert rank_pattern(tuned) == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    torch.testing.assert_close(logits(tuned), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_peftkit_adalora_file_loads_in_peft(tmp_path, builder):
    options = {"init_r": 4, "target_r": 2, "total_steps": STEPS, "t_init": 1, "t_final": 2, "delta_t": 1, "alpha": 8}
    tuned = peftkit.attach(builder(), peftkit.config("adalora", **options))
    train(tuned, tuned.trainable_parameters(), tuned.update)
    ranks = rank_pattern(tuned)
    assert sum(ranks.values()) == 2 * len(ranks), "the final budget is target_r per site on average"
    expected = logits(tuned)
    tuned.save(tmp_path / "hf", format="hf-peft")
    loaded = peft.PeftModel.from_pretrained(builder(), str(tmp_path / "hf"))
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)
    again = peftkit.load(builder(), tmp_path / "hf")  # and back: exact
    assert torch.equal(logits(again), expected)
