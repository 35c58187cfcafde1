"""A peftkit adapter trained by `transformers.Trainer`.

    .venv/bin/python examples/hf_trainer.py

`PeftkitCallback` calls `tuned.update(step)` after each optimizer step (methods such as AdaLoRA
need it) and writes `checkpoint-N/adapter/`; `PeftkitTrainer` (same arguments) would keep only
the adapter in its checkpoints.
"""

import torch
from transformers import (
             AutoModelForSequenceClassification,
             AutoTokenizer,
             DataCollatorWithPadding,
             Trainer,
             TrainingArguments,
)

import peftkit
from peftkit.train import PeftkitCallback, assets

path = assets.model_path("minilm")
tok = AutoTokenizer.from_pretrained(path)
data = assets.rotten_tomatoes()
rows = [r for r, held in zip(data.records, data.split, strict=True) if not held][:512]
enc = tok([r["text"] for r in rows], truncation=True, max_length=64)
train_set = [{"input_ids": i, "attention_mask": m, "labels": r["label"]}
             for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)]

torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
tuned = peftkit.attach(model, peftkit.config("lora", r=8, targets=["query", "value"]))
args = TrainingArguments(output_dir="runs/hf-example", max_steps=20, per_device_train_batch_size=16,
                         learning_rate=1e-3, save_steps=10, report_to=[], use_cpu=True)
Trainer(model=tuned, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok),
        callbacks=[PeftkitCallback()]).train()
tuned.save("runs/hf-example/adapter")
print(peftkit.load(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                   "runs/hf-example/adapter").summary())
