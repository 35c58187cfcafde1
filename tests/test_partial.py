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


# -- the two ends of the family: full fine-tuning and head only ------------------------------------------
def _grads_by_weight(tuned) -> dict[str, torch.Tensor]:
    """Each trained copy's gradient under the name of the model weight it copies."""
    out = {}
    for prefix, delta in tuned.deltas("default"):
        site = prefix.rsplit(".", 1)[0]
        for name, p in delta.named_parameters():
            out[f"{site}.{name.removeprefix('values.').replace('__', '.')}"] = p.grad
    return out


@pytest.mark.parametrize("model_name", ["bert", "llama", "gpt2"])
def test_full_trains_every_weight_as_plain_fine_tuning_does(model_name):
    """Every weight has a trainable copy, counted once, and one backward gives the plain model's
    gradients exactly: the tied output projection of Llama / GPT-2 trains the embedding's copy."""
    import copy

    from models import loss_of

    model = BUILDERS[model_name]()
    plain = copy.deepcopy(model).train()
    inputs = batch(model_name)
    tuned = peftkit.attach(model, peftkit.config("full")).train()
    assert tuned.summary().trainable == sum(p.numel() for p in plain.parameters())
    loss_of(tuned(**inputs)).backward()
    loss_of(plain(**inputs)).backward()
    grads = _grads_by_weight(tuned)
    expected = {n: p.grad for n, p in plain.named_parameters()}
    assert set(expected) <= set(grads)
    for name, grad in expected.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name


def test_full_keeps_tied_weights_tied_through_save_and_load(tmp_path):
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config("full"))
    with torch.no_grad():
        tuned.model.model.embed_tokens.deltas["default"]["full"].values["weight"].add_(0.5)
    inputs = batch("llama")
    tuned.save(tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter.safetensors"))
    assert not any(k.startswith("lm_head") for k in keys)  # stored once, by the embedding
    loaded = peftkit.load(BUILDERS["llama"](), tmp_path / "a")
    assert torch.equal(_run(loaded, inputs), _run(tuned, inputs))
    assert not torch.equal(_run(loaded, inputs), _run(BUILDERS["llama"](), inputs))


def test_head_only_trains_the_head_and_refuses_models_without_one():
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("head_only"))
    summary = tuned.summary()
    assert summary.trainable == summary.head_trainable > 0
    assert set(tuned.sites("default")) == {"classifier"}
    with pytest.raises(peftkit.errors.TargetError, match="no.*task head|has none"):
        peftkit.attach(BUILDERS["llama"](), peftkit.config("head_only"))
    with pytest.raises(peftkit.errors.TargetError, match="trains nothing"):
        peftkit.attach(BUILDERS["bert"](), peftkit.config("head_only", trainable_modules=None))
