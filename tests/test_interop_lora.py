"""LoRA / rsLoRA / DoRA files exchanged with the real `peft` package, in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from models import BUILDERS, batch, output_tensor
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**{k: v for k, v in inputs.items() if k != "labels"}))


def randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
def test_peft_reads_peftkit(model_name, variant, tmp_path):
    options = {"rslora": variant == "rslora", "dora": variant == "dora"}
    tuned = peftkit.attach(BUILDERS[model_name](), peftkit.config("lora", r=4, alpha=8, **options))
    randomize(tuned.trainable_parameters(), seed=1)
    inputs = batch(model_name)
    expected = logits(tuned, inputs)
    tuned.save(tmp_path / "hf", format="hf-peft")
    written = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == TASK[model_name]
    loaded = PeftModel.from_pretrained(BUILDERS[model_name](), tmp_path / "hf")
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
def test_peftkit_reads_peft(model_name, variant, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_name], task_type=TASK[model_name],
                        **VARIANTS[variant])
    model = get_peft_model(BUILDERS[model_name](), config)
    randomize([p for p in model.parameters() if p.requires_grad], seed=2)
    inputs = batch(model_name)
    expected = logits(model.eval(), inputs)
    model.save_pretrained(tmp_path / "peft")
    tuned = peftkit.load(BUILDERS[model_name](), tmp_path / "peft")
    torch.testing.assert_close(logits(tuned, inputs), expected, atol=1e-5, rtol=1e-5)
    assert tuned.config_of("default").dora == (variant == "dora")
    assert tuned.config_of("default").rslora == (variant == "rslora")


def test_patterns_embeddings_and_bias_round_trip_through_peft(tmp_path):
    """rank/alpha patterns, an embedding target and trained biases survive peft → peftkit → peft."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"], bias="lora_only",
                        rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32},
                        task_type="CAUSAL_LM")
    model = get_peft_model(BUILDERS["llama"](), config)
    randomize([p for p in model.parameters() if p.requires_grad], seed=3)
    inputs = batch("llama")
    expected = logits(model.eval(), inputs)
    model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    tuned = peftkit.load(BUILDERS["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(tuned, inputs), expected, atol=1e-5, rtol=1e-5)
    tuned.save(tmp_path / "back", format="hf-peft")
    again = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "back")
    torch.testing.assert_close(logits(again, inputs), expected, atol=1e-5, rtol=1e-5)


def test_unsupported_peft_option_is_refused_cleanly(tmp_path):
    model = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    model.save_pretrained(tmp_path / "peft")
    fresh = BUILDERS["llama"]()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(peftkit.errors.AdapterFileError, match="lora_bias"):
        peftkit.load(fresh, tmp_path / "peft")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
