"""Partial (select-form) methods: what BitFit, LayerNorm tuning and layer tuning select, store and
restore. Exactness across all models is in the contract suite (test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS, batch, output_tensor
from safetensors.torch import load_file

import peftkit


def _run(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}))


def _backbone_params(model, suffix: str) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if n.endswith(suffix) and not n.startswith("classifier")}


def test_bitfit_all_selects_every_backbone_bias():
    model = BUILDERS["bert"]()
    expected = _backbone_params(model, ".bias")
    tuned = peftkit.attach(model, peftkit.config("bitfit"))
    sites = {s for s in tuned.sites("default") if not s.startswith("classifier")}
    assert sites == {n.removesuffix(".bias") for n in expected}
    assert tuned.summary().trainable_without_head == sum(expected.values())


@pytest.mark.parametrize("biases", [["query", "ffn_in"], ["query", "intermediate"]])
def test_bitfit_subset_query_and_ffn_intermediate(biases):
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("bitfit", biases=biases))
    sites = [s for s in tuned.sites("default") if s != "classifier"]
    assert sites == [f"bert.encoder.layer.{i}.{m}" for i in range(2)
                     for m in ("attention.self.query", "intermediate.dense")]


def test_bitfit_errors_name_the_problem():
    with pytest.raises(peftkit.errors.TargetError, match="no bias"):
        peftkit.attach(BUILDERS["llama"](), peftkit.config("bitfit"))
    with pytest.raises(peftkit.errors.TargetError, match="fused"):
        peftkit.attach(BUILDERS["gpt2"](), peftkit.config("bitfit", biases=["query"]))
    with pytest.raises(peftkit.errors.TargetError, match="quer"):
        peftkit.attach(BUILDERS["bert"](), peftkit.config("bitfit", biases=["qeury.dense"]))


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_ln_tuning_selects_every_norm(model_name):
    model = BUILDERS[model_name]()
    norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    tuned = peftkit.attach(model, peftkit.config("ln_tuning"))
    assert [s for s in tuned.sites("default") if s != "classifier"] == norms
    with pytest.raises(peftkit.errors.TargetError, match="normalisation"):
        peftkit.attach(BUILDERS[model_name](), peftkit.config("ln_tuning", targets=["re:.*layers?\\.0\\..*proj"
                                                                                    if model_name == "llama"
                                                                                    else "query"]))


def test_layer_tuning_covers_whole_blocks():
    model = BUILDERS["llama"]()
    last = {n: p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.1.")}
    tuned = peftkit.attach(model, peftkit.config("layer_tuning"))
    assert tuned.summary().trainable == sum(last.values())
    state = tuned.adapter_state("default")
    assert {k.replace(".layer.values.", ".") for k in state} == set(last)
    both = peftkit.attach(BUILDERS["bert"](), peftkit.config("layer_tuning", layers="0-1", targets=["pooler"]))
    tuned_names = {s for s in both.sites("default")}
    assert "bert.pooler.dense" in tuned_names and "bert.encoder.layer.0.attention.self.query" in tuned_names
    assert not any(s.startswith("bert.embeddings") for s in tuned_names)
    with pytest.raises(peftkit.errors.ConfigError, match="last_k"):
        peftkit.config("layer_tuning", last_k=0)


@pytest.mark.parametrize("method,slot", [("bitfit", "bias"), ("ln_tuning", "ln"), ("layer_tuning", "layer")])
def test_file_holds_only_tuned_tensors_and_head(method, slot, tmp_path):
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config(method))
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    inputs = batch("bert")
    tuned.train()
    for _ in range(3):
        optimizer.zero_grad()
        tuned(**inputs).loss.backward()
        optimizer.step()
    tuned.eval()
    tuned.save(tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter.safetensors"))
    assert {k.split(".")[0] for k in keys if f".{slot}." not in k} == {"classifier"}  # the head, trained as a copy
    assert all(".copy." in k for k in keys if k.startswith("classifier"))
    head = dict(tuned.model.classifier.base_layer.named_parameters())
    assert not torch.equal(tuned.adapter_state("default")["classifier.copy.values.weight"], head["weight"])
    loaded = peftkit.load(BUILDERS["bert"](), tmp_path / "a")
    assert torch.equal(_run(loaded, inputs), _run(tuned, inputs))
    with loaded.disabled():
        assert torch.equal(_run(loaded, inputs), _run(BUILDERS["bert"](), inputs))


def _peft_ln_model(model_name):
    from peft import LNTuningConfig, get_peft_model

    model = BUILDERS[model_name]()
    task = "SEQ_CLS" if model_name == "bert" else "CAUSAL_LM"
    targets = ["LayerNorm"] if model_name == "bert" else ["input_layernorm", "post_attention_layernorm", "norm"]
    return get_peft_model(model, LNTuningConfig(task_type=task, target_modules=targets))


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_ln_tuning_reads_and_writes_peft_files_exactly(model_name, tmp_path):
    inputs = batch(model_name)
    peft_model = _peft_ln_model(model_name)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval()
    expected = _run(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = peftkit.load(BUILDERS[model_name](), tmp_path / "peft")
    assert ours.config_of("default").method == "ln_tuning"
    assert torch.equal(_run(ours, inputs), expected)

    ours.save(tmp_path / "back", format="hf-peft")
    from peft import PeftModel

    again = PeftModel.from_pretrained(BUILDERS[model_name](), tmp_path / "back").eval()
    assert torch.equal(_run(again, inputs), expected)
