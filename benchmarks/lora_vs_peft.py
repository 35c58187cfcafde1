"""peftkit LoRA against the `peft` package on the real all-MiniLM-L6-v2: training step time,
activation memory saved for backward, trainable parameters and adapter file size.

    .venv/bin/python benchmarks/lora_vs_peft.py [--repeats 8] [--variant lora|rslora|dora]

Prints ratios peftkit / peft measured in the same process (interleaved runs, median).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from _common import interleaved_median, load_minilm, minilm_batch, saved_activation_bytes
from peft import LoraConfig, get_peft_model

import peftkit


def file_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--variant", choices=["lora", "rslora", "dora"], default="lora")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = {"rslora": args.variant == "rslora", "dora": args.variant == "dora"}

    ours = peftkit.attach(load_minilm(), peftkit.config("lora", r=8, alpha=16, dropout=0.1, **flags)).train()
    theirs = get_peft_model(load_minilm(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                                      target_modules=["query", "value"], use_rslora=flags["rslora"],
                                                      use_dora=flags["dora"])).train()
    batch = minilm_batch()
    optimizers = {"peftkit": torch.optim.AdamW(ours.trainable_parameters(), lr=1e-4),
                  "peft": torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)}
    models = {"peftkit": ours, "peft": theirs}

    def step(name: str):
        def run() -> None:
            optimizers[name].zero_grad(set_to_none=True)
            models[name](**batch).loss.backward()
            optimizers[name].step()
        return run

    seconds = interleaved_median({k: step(k) for k in models}, repeats=args.repeats)
    memory = {k: saved_activation_bytes(lambda m=m: m(**batch).loss) for k, m in models.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ours.save(os.path.join(tmp, "a"))
        theirs.save_pretrained(os.path.join(tmp, "b"))
        size = {"peftkit": file_bytes(os.path.join(tmp, "a")), "peft": file_bytes(os.path.join(tmp, "b"))}

    print(f"all-MiniLM-L6-v2, {args.variant} r=8 on query/value, batch 32x64, {args.threads} threads, "
          f"median of {args.repeats} interleaved steps")
    print(f"{'':22}{'peftkit':>14}{'peft':>14}{'ratio':>9}")
    rows = [("step time (s)", seconds), ("saved activations (MB)", {k: v / 2**20 for k, v in memory.items()}),
            ("trainable params", trainable), ("adapter file (KB)", {k: v / 1024 for k, v in size.items()})]
    for label, values in rows:
        print(f"{label:22}{values['peftkit']:>14.3f}{values['peft']:>14.3f}{values['peftkit'] / values['peft']:>9.3f}")


if __name__ == "__main__":
    main()
