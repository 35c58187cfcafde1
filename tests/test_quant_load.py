"""Loading a model folder straight into quantized form (`peftkit.quant.load_quantized`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from models import batch, tiny_bert, tiny_gpt2, tiny_llama
from transformers import BertModel, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.quant import QuantLinear, load_quantized
from peftkit.quant.loading import LoadError


def _storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("builder,name,task", [(tiny_llama, "llama", "causal-lm"), (tiny_gpt2, "gpt2", "causal-lm"),
                                               (tiny_bert, "bert", "classification")])
def test_load_quantized_equals_quantize_after_loading(builder, name, task, tmp_path):
    builder().save_pretrained(tmp_path)
    expected = peftkit.quantize(builder(), "nf4")
    loaded = load_quantized(tmp_path, "nf4", task=task)
    assert type(loaded) is type(expected)
    want, got = _storage(expected), _storage(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    inputs = {k: v for k, v in batch(name).items() if k != "labels"}
    assert torch.equal(loaded(**inputs).logits, expected.eval()(**inputs).logits)
    if name == "llama":  # tied output embedding stays tied and in full precision
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_quantized_base_checkpoint_into_a_classifier(tmp_path):
    tiny_bert().bert.save_pretrained(tmp_path)  # keys without the "bert." prefix, no classifier
    model = load_quantized(tmp_path, "int8", task="classification", num_labels=3)
    assert model.classifier.out_features == 3 and not model.classifier.weight.is_meta
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_load_quantized_errors(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        load_quantized(tmp_path, "nf4")
    BertModel(tiny_bert().config).save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no model.safetensors"):
        load_quantized(tmp_path, "nf4")
    with pytest.raises(peftkit.errors.ConfigError):
        load_quantized(tmp_path, "nf5")


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from peftkit.quant import load_quantized, memory
    load_quantized(sys.argv[2], "nf4")  # warm-up on a tiny model: imports are not what is measured
    memory.release(collect=True)
    memory.reset_peak_rss()
    before = memory.rss_bytes()
    model = load_quantized(sys.argv[1], "nf4")
    print(json.dumps({"peak": memory.peak_rss_bytes() - before, "held": memory.rss_bytes() - before}))
""")


def test_loading_peak_memory_stays_near_the_quantized_size(tmp_path):
    """Resident memory as the OS counts it, in a fresh process: the fp32 model is never held at once
    (loading it takes at least its file size; see benchmarks/quant.py for the side-by-side figures)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)  # 4 x 4.2M linear weights: 67 MB in fp32, 9 MB in NF4
    fp32_bytes = (tmp_path / "model.safetensors").stat().st_size
    tiny_llama().save_pretrained(tmp_path / "warm")
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(tmp_path / "warm")],
                         capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["held"] < 0.25 * fp32_bytes, (measured, fp32_bytes)
    assert measured["peak"] < 0.45 * fp32_bytes, (measured, fp32_bytes)  # quantized + one layer + temporaries
