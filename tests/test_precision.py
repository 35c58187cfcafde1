"""--precision: what each setting does to the base, the adapters and the loss, and what it refuses."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.train import precision
from peftkit.train.config import TrainConfig
from peftkit.train.run import train


def test_auto_is_fp32_without_native_bf16_and_bf16_fp16_are_refused_where_slow():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == "fp32" and precision.resolve("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="no native bfloat16"):
        precision.resolve("bf16", cpu)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        precision.resolve("fp16", cpu)


def test_bf16_stores_the_base_in_bf16_trains_float32_adapters_and_loses_little(tmp_path, monkeypatch, bert_dir,
                                                                                 sentiment_csv):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # as on a CPU with AMX
    common = {"model": str(bert_dir), "data": str(sentiment_csv), "max_steps": 6, "progress": False,
              "method": "lora", "seed": 0, "eval_before": False}
    loaded = []
    original = peftkit.train.run.models.load

    def spy(*args, **kwargs):
        loaded.append(kwargs.get("dtype"))
        return original(*args, **kwargs)

    monkeypatch.setattr(peftkit.train.run.models, "load", spy)
    fp32 = train(TrainConfig(**common, precision="fp32", out=str(tmp_path / "a")), echo=lambda _s: None)
    bf16 = train(TrainConfig(**common, precision="bf16", out=str(tmp_path / "b")), echo=lambda _s: None)
    assert loaded == [None, torch.bfloat16]
    assert abs(bf16["metrics"]["loss"] - fp32["metrics"]["loss"]) < 0.05 * fp32["metrics"]["loss"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors")).values()} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", ["bf16", "fp16"])
def test_half_precision_training_on_cuda(tmp_path, setting, bert_dir, sentiment_csv):
    if setting == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = train(TrainConfig(model=str(bert_dir), data=str(sentiment_csv), max_steps=6, progress=False,
                               precision=setting, out=str(tmp_path / setting)), echo=lambda _s: None)
    assert result["steps"] == 6 and torch.isfinite(torch.tensor(result["metrics"]["loss"]))


def test_bf16_trains_a_causal_lm_with_the_chunked_loss(tmp_path, monkeypatch, llama_dir, chat_jsonl):
    """The causal-LM path under bf16 autocast: the chunked vocabulary loss runs in it, and the run ends with
    a finite held-out loss close to fp32's."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    common = {"model": str(llama_dir), "data": str(chat_jsonl), "task": "instruction", "max_steps": 4,
              "progress": False, "seed": 0, "eval_before": False}
    fp32 = train(TrainConfig(**common, precision="fp32", out=str(tmp_path / "a")), echo=lambda _s: None)
    bf16 = train(TrainConfig(**common, precision="bf16", out=str(tmp_path / "b")), echo=lambda _s: None)
    assert bf16["steps"] == 4 and abs(bf16["metrics"]["loss"] - fp32["metrics"]["loss"]) < 0.05 * fp32["metrics"]["loss"]


def test_auto_can_be_pinned_to_fp32_by_the_environment(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # as on a CPU with AMX
    cpu = torch.device("cpu")
    monkeypatch.delenv("PEFTKIT_AUTO_PRECISION", raising=False)
    assert precision.resolve("auto", cpu) == "bf16"
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "fp32")
    assert precision.resolve("auto", cpu) == "fp32" and precision.resolve("bf16", cpu) == "bf16"


def test_another_value_of_the_pin_is_a_clear_error(monkeypatch):
    from peftkit.errors import PeftkitError

    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "bf16")
    with pytest.raises(PeftkitError, match="PEFTKIT_AUTO_PRECISION='bf16'.*only value it takes is fp32"):
        precision.resolve("auto", torch.device("cpu"))
