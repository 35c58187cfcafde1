"""Pruning all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, then recovering with LoRA.

    nice .venv/bin/python benchmarks/prune.py                      # 50 % unstructured and 2:4
    nice .venv/bin/python benchmarks/prune.py --structured         # + 25 % of heads, 50 % of FFN channels

1. dense: LoRA (r=8, query/value) + the classification head trained on the fixed train split, merged
   into the encoder: the fine-tuned dense model (its test accuracy is the reference);
2. each pruning applied to a copy of it (all linear layers of the encoder, classifier excluded):
   sparsity, parameter counts and test accuracy straight after pruning;
3. recovery: a fresh LoRA (r=8, all linear layers) + the head trained on the pruned, frozen base for
   `--recover-steps`; test accuracy after. The base keeps its zeros (checked).

Accuracy is on the first `--test` examples of the fixed 20 % test split (seeded, same for all rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data(tok: Any, max_length: int, test: int) -> tuple[list[dict], list[dict]]:
    from peftkit.train import assets

    ds = assets.rotten_tomatoes()
    train = [r for r, held in zip(ds.records, ds.split, strict=True) if not held]
    held = [r for r, h in zip(ds.records, ds.split, strict=True) if h][:test]

    def encode(rows: list[dict]) -> list[dict]:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "label": r["label"]} for ids, r in zip(enc["input_ids"], rows, strict=True)]

    return encode(train), encode(held)


def collate(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}


@torch.no_grad()
def accuracy(model: torch.nn.Module, rows: list[dict], pad: int, batch: int = 128) -> float:
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding
    correct = 0
    for start in range(0, len(order), batch):
        part = collate([rows[i] for i in order[start:start + batch]], pad)
        labels = part.pop("labels")
        correct += int((model(**part).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def train(tuned: torch.nn.Module, rows: list[dict], pad: int, steps: int, batch: int, lr: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    tuned.train()
    start, loss = time.perf_counter(), None
    for _ in range(steps):
        idx = torch.randint(len(rows), (batch,), generator=g).tolist()
        optimizer.zero_grad(set_to_none=True)
        loss = tuned(**collate([rows[i] for i in idx], pad)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-steps", type=int, default=250)
    parser.add_argument("--recover-steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--test", type=int, default=1000, help="test examples (of 2490)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--structured", action="store_true", help="also prune heads and FFN channels")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    import peftkit
    from peftkit import prune
    from peftkit.train import assets

    logging.set_verbosity_error()
    path = assets.model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id
    train_rows, test_rows = data(tok, args.max_length, args.test)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    results: dict[str, Any] = {"config": vars(args), "rows": []}
    tuned = peftkit.attach(base, peftkit.config("lora", r=8, alpha=16))
    seconds = train(tuned, train_rows, pad, args.dense_steps, args.batch, args.lr, seed=0)
    dense = tuned.merge()
    results["dense"] = {"accuracy": accuracy(dense, test_rows, pad), "train_seconds": round(seconds, 1),
                        "params": prune.count_params(dense)}
    print(f"dense fine-tuned: accuracy {results['dense']['accuracy']:.4f} ({seconds:.0f} s)", flush=True)
    plans = {"magnitude 50%": lambda m: prune.magnitude_prune(m, 0.5), "2:4": lambda m: prune.nm_prune(m, 2, 4)}
    if args.structured:
        plans["heads 25%"] = lambda m: prune.prune_heads(m, 0.25)
        plans["FFN channels 50%"] = lambda m: prune.prune_channels(m, 0.5)
    for name, apply in plans.items():
        model = copy.deepcopy(dense)
        report = apply(model)
        pruned_acc = accuracy(model, test_rows, pad)
        zeros_before = prune.sparsity_report(model).zeros
        recovery = peftkit.attach(model, peftkit.config("lora", r=8, alpha=16, targets="all-linear"))
        seconds = train(recovery, train_rows, pad, args.recover_steps, args.batch, args.lr, seed=1)
        recovered_acc = accuracy(recovery, test_rows, pad)
        with recovery.disabled():
            zeros_kept = prune.sparsity_report(recovery.model).zeros == zeros_before
        row = {"pruning": name, **report.as_dict(), "accuracy_pruned": pruned_acc,
               "accuracy_recovered": recovered_acc, "recovery_trainable": recovery.summary().trainable,
               "recovery_seconds": round(seconds, 1), "zeros_kept": zeros_kept}
        results["rows"].append(row)
        print(f"{name}: {report}\n  accuracy pruned {pruned_acc:.4f} -> after LoRA recovery {recovered_acc:.4f} "
              f"(dense {results['dense']['accuracy']:.4f}); base zeros kept: {zeros_kept}", flush=True)
    print(f"\n{'pruning':<18} {'sparsity':>8} {'params':>11} {'non-zero':>11} {'acc pruned':>10} {'acc recovered':>13}")
    print(f"{'dense (LoRA FT)':<18} {0:>8.2%} {results['dense']['params']:>11,} {'':>11} "
          f"{results['dense']['accuracy']:>10.4f} {'':>13}")
    for r in results["rows"]:
        print(f"{r['pruning']:<18} {r['sparsity']:>8.2%} {r['params_after']:>11,} {r['nonzero_params']:>11,} "
              f"{r['accuracy_pruned']:>10.4f} {r['accuracy_recovered']:>13.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
