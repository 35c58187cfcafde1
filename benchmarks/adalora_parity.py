"""peftkit's AdaLoRA against peft's on the same batches: task loss (regulariser removed) along training
and held-out accuracy, to tell an implementation bug from the method's behaviour.

    nice .venv/bin/python benchmarks/adalora_parity.py peftkit
    nice .venv/bin/python benchmarks/adalora_parity.py peft

all-MiniLM-L6-v2 + Rotten Tomatoes, init_r 8 → target_r 4 on query/value, alpha 16, orth_reg 0.1, t_init 15,
t_final 30, ΔT 10, plain AdamW loop (lr 1e-3, batch 16, clipping 1.0, seed 0), accuracy on the first 400 held-out.
"""

from __future__ import annotations

import sys

import torch
from _common import minilm_path

import peftkit


def main(which: str, steps: int = 150, lr: float = 1e-3) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from peftkit.train import assets

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = assets.rotten_tomatoes()
    train = [r for r, held in zip(data.records, data.split, strict=True) if not held]
    test = [r for r, held in zip(data.records, data.split, strict=True) if held][:400]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if which == "peft":
        from peft import AdaLoraConfig, get_peft_model

        tuned = get_peft_model(model, AdaLoraConfig(
            init_r=8, target_r=4, tinit=15, tfinal=30, deltaT=10, total_step=steps, lora_alpha=16,
            orth_reg_weight=0.1, target_modules=["query", "value"], task_type="SEQ_CLS"))
        update = tuned.base_model.update_and_allocate
    else:
        tuned = peftkit.attach(model, peftkit.config("adalora", init_r=8, target_r=4, t_init=15, t_final=30,
                                                     delta_t=10, alpha=16, orth_reg=0.1, total_steps=steps))
        update = tuned.update
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)

    def encode(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return batch

    tuned.train()
    for step in range(steps):
        batch = encode([train[i] for i in torch.randint(len(train), (16,), generator=generator)])
        out = tuned(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        update(step)
        optimizer.zero_grad()
        if step % 15 == 0 or step == steps - 1:
            task = torch.nn.functional.cross_entropy(out.logits.detach(), batch["labels"]).item()
            print(f"{which} step {step}: loss with regulariser {out.loss.item():.3f}, task loss {task:.3f}", flush=True)
    tuned.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 100):
            batch = encode(test[start:start + 100])
            correct += int((tuned(**batch).logits.argmax(-1) == batch["labels"]).sum())
    print(f"{which} held-out accuracy {correct / len(test):.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "peftkit")
