"""A TunedModel inside `transformers.Trainer`: trains, checkpoints, resumes and saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import chat_rows, sentiment_rows
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

import peftkit
from peftkit.train import PeftkitCallback, PeftkitTrainer
from peftkit.train.models import tokenizer


class Rows(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def _classification_rows(folder: Path) -> Rows:
    tok = tokenizer(str(folder))
    enc = tok([r["text"] for r in sentiment_rows(32)], padding="max_length", max_length=16, truncation=True,
              return_tensors="pt")
    labels = torch.tensor([r["label"] for r in sentiment_rows(32)])
    return Rows([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
                 for i in range(32)])


def _lm_rows(folder: Path) -> Rows:
    tok = tokenizer(str(folder))
    texts = [f"{r['prompt']} {r['response']}" for r in chat_rows(16)]
    enc = tok(texts, padding="max_length", max_length=12, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return Rows([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
                 for i in range(16)])


def _args(out: Path, steps: int = 6, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                save_strategy="steps", save_steps=3, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                data_seed=0, dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant",
                warmup_steps=0)
    base.update(kw)
    return TrainingArguments(**base)


def _bert_tuned(folder: Path) -> peftkit.TunedModel:
    torch.manual_seed(0)
    return peftkit.attach(AutoModelForSequenceClassification.from_pretrained(folder), peftkit.config("lora"))


def test_plain_trainer_with_callback(tmp_path, bert_dir) -> None:
    tuned = _bert_tuned(bert_dir)
    base_before = {n: p.clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    adapter_before = {k: v.clone() for k, v in tuned.adapter_state("default").items()}
    steps = []
    tuned.update = lambda step: steps.append(step)  # what the callback must call, once per optimizer step
    trainer = Trainer(model=tuned, args=_args(tmp_path / "hf"), train_dataset=_classification_rows(bert_dir),
                      callbacks=[PeftkitCallback()])
    trainer.train()
    assert steps == list(range(6))
    assert all(torch.equal(p, base_before[n]) for n, p in tuned.named_parameters() if n in base_before)
    after = tuned.adapter_state("default")
    assert any(not torch.equal(after[k], adapter_before[k]) for k in after)
    # every checkpoint also holds a peftkit adapter that loads onto a fresh base
    saved = tmp_path / "hf" / "checkpoint-6" / "adapter"
    loaded = peftkit.load(AutoModelForSequenceClassification.from_pretrained(bert_dir), saved)
    for k, v in loaded.adapter_state("default").items():
        assert torch.equal(v, after[k])
    # resuming the Trainer from checkpoint-3 ends where the uninterrupted run ended
    again = _bert_tuned(bert_dir)
    Trainer(model=again, args=_args(tmp_path / "hf"), train_dataset=_classification_rows(bert_dir),
            callbacks=[PeftkitCallback()]).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-3"))
    for k, v in again.adapter_state("default").items():
        torch.testing.assert_close(v, after[k], atol=1e-6, rtol=1e-5)


def test_peftkit_trainer_saves_adapter_only_with_tied_weights(tmp_path, llama_dir) -> None:
    torch.manual_seed(0)
    tuned = peftkit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), peftkit.config("lora", targets="all-linear"))
    trainer = PeftkitTrainer(model=tuned, args=_args(tmp_path / "hf"), train_dataset=_lm_rows(llama_dir))
    trainer.train()
    ckpt = tmp_path / "hf" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter.safetensors", "adapter.json"} <= names and "model.safetensors" not in names
    trainer.save_model(str(tmp_path / "final"))
    loaded = peftkit.load(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "final")
    ids = torch.randint(7, 38, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits)
    # resume restores the adapter from the adapter-only checkpoint
    torch.manual_seed(0)
    again = peftkit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), peftkit.config("lora", targets="all-linear"))
    PeftkitTrainer(model=again, args=_args(tmp_path / "hf"), train_dataset=_lm_rows(llama_dir)).train(
        resume_from_checkpoint=str(ckpt))
    for k, v in again.adapter_state("default").items():
        torch.testing.assert_close(v, tuned.adapter_state("default")[k], atol=1e-6, rtol=1e-5)


def test_callback_warns_about_tied_weights(tmp_path, llama_dir) -> None:
    tuned = peftkit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), peftkit.config("lora"))
    with pytest.warns(UserWarning, match="PeftkitTrainer"):
        Trainer(model=tuned, args=_args(tmp_path), train_dataset=_lm_rows(llama_dir), callbacks=[PeftkitCallback()])


def test_peftkit_trainer_needs_a_tuned_model(tmp_path, bert_dir) -> None:
    with pytest.raises(TypeError, match="TunedModel"):
        PeftkitTrainer(model=AutoModelForSequenceClassification.from_pretrained(bert_dir), args=_args(tmp_path))
