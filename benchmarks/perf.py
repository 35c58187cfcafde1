"""Speed and memory of peftkit's training step, every figure a ratio against a baseline measured in the
same run (this machine is shared and noisy).

    .venv/bin/python benchmarks/perf.py [--quick] [--models minilm smollm2] [--sections lora methods ...]
                                        [--threads N] [--repeats N] [--out benchmarks/results/perf.md]

The floor: the same model and batch with every weight frozen, forward + backward to the input
embeddings — what any method that trains something inside the network must pay at least. Each row's
step is forward + backward + AdamW step, timed interleaved with the floor (A B A B …, median). Memory
is counted exactly, not sampled: the bytes of tensors autograd saves for backward (each storage
once) plus the trainable state (parameters, gradients and AdamW's two moments).

Sections:
- ``lora`` — peftkit against the ``peft`` package: r=8, alpha=16 on query/value with dropout 0.1 and 0,
  and on every linear layer (the trainer's default), step time over the floor and memory against peft.
- ``methods`` — every registered method with its defaults: step time and memory over the floor.

``--quick`` runs tiny random models for one repeat: a smoke test of this script (tests run it), not a
measurement. Batches: MiniLM 32×64, SmolLM2 4×256 (random tokens).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_median, saved_activation_bytes  # noqa: E402

import peftkit  # noqa: E402

SECTIONS = ("lora", "methods")
# Methods that need an option to exist at all; every other method runs with its defaults.
REQUIRED = {"adalora": {"total_steps": 100}, "compose": {"parts": [{"method": "lora"}, {"method": "ln_tuning"}]}}


@dataclass
class Bench:
    """One model and batch to measure on, and how to make fresh copies of the model."""

    name: str
    make: Callable[[], torch.nn.Module]
    batch: dict[str, torch.Tensor]
    causal: bool
    lora_targets: list[str] = field(default_factory=list)  # peft's names for the query/value projections


def _random_batch(vocab: int, batch: int, length: int, causal: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab - 1, (batch, length), generator=g)
    labels = ids.clone() if causal else torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def benches(names: list[str], quick: bool) -> list[Bench]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    out = []
    for name in names:
        if quick:
            make = _tiny(name)
            vocab = make().config.vocab_size
            shape = (4, 16)
        else:
            from peftkit.train import assets

            path = assets.model_path(name)
            if name == "minilm":
                def make(path: str = path) -> torch.nn.Module:
                    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            else:
                def make(path: str = path) -> torch.nn.Module:
                    return AutoModelForCausalLM.from_pretrained(path)
            vocab = make().config.vocab_size
            shape = (32, 64) if name == "minilm" else (4, 256)
        causal = name != "minilm"
        targets = ["query", "value"] if name == "minilm" else ["q_proj", "v_proj"]
        out.append(Bench(name, make, _random_batch(vocab, *shape, causal), causal, targets))
    return out


def _tiny(name: str) -> Callable[[], torch.nn.Module]:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        if name == "minilm":
            return BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4))
        return LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    return make


# -- what is measured -------------------------------------------------------------------------------------
def floor_step(bench: Bench) -> Callable[[], None]:
    model = bench.make().train().requires_grad_(False)
    embed = model.get_input_embeddings()
    inputs = {k: v for k, v in bench.batch.items() if k != "input_ids"}

    def step() -> None:
        x = embed(bench.batch["input_ids"]).detach().requires_grad_()
        model(inputs_embeds=x, **inputs).loss.backward()

    return step


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # what peftkit's trainer uses, for both sides

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes kept for backward in one step plus the trainable state (parameter, gradient, two moments)."""
    saved = saved_activation_bytes(lambda: model(**batch).loss)
    model.zero_grad(set_to_none=True)
    trainable = sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return saved + trainable


def peft_model(bench: Bench, targets: Any, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    task = "CAUSAL_LM" if bench.causal else "SEQ_CLS"
    return get_peft_model(bench.make(), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                                   task_type=task))


# -- sections ---------------------------------------------------------------------------------------------
def section_lora(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for label, targets, dropout in (("q,v dropout 0.1", bench.lora_targets, 0.1), ("q,v dropout 0", bench.lora_targets, 0.0),
                                    ("all linear, dropout 0", "all-linear", 0.0)):
        ours = peftkit.attach(bench.make(), peftkit.config("lora", r=8, alpha=16, dropout=dropout, targets=targets)).train()
        theirs = peft_model(bench, targets, dropout).train()
        times = interleaved_median({"floor": floor_step(bench), "peftkit": train_step(ours, bench.batch),
                                    "peft": train_step(theirs, bench.batch)}, repeats=repeats)
        mem = {"peftkit": memory(ours, bench.batch), "peft": memory(theirs, bench.batch)}
        rows.append({"model": bench.name, "lora": label, "floor (s)": times["floor"],
                     "peftkit / floor": times["peftkit"] / times["floor"], "peft / floor": times["peft"] / times["floor"],
                     "peftkit / peft (time)": times["peftkit"] / times["peft"],
                     "peftkit / peft (memory)": mem["peftkit"] / mem["peft"],
                     "memory peftkit (MB)": mem["peftkit"] / 2**20, "memory peft (MB)": mem["peft"] / 2**20})
    return rows


def section_methods(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    floor_model = bench.make().train()
    floor_memory = _floor_memory(floor_model, bench)
    rows = []
    for method in peftkit.methods():
        try:
            tuned = peftkit.attach(bench.make(), peftkit.config(method, **REQUIRED.get(method, {}))).train()
        except peftkit.PeftkitError as err:  # e.g. BitFit on a model without biases
            rows.append({"model": bench.name, "method": method, "note": str(err).split(";")[0][:80]})
            continue
        if tuned.needs_calibration:
            tuned.calibrate([bench.batch])
        times = interleaved_median({"floor": floor_step(bench), method: train_step(tuned, bench.batch)}, repeats=repeats)
        rows.append({"model": bench.name, "method": method, "step / floor": times[method] / times["floor"],
                     "memory / floor": memory(tuned, bench.batch) / floor_memory,
                     "trainable": sum(p.numel() for p in tuned.parameters() if p.requires_grad)})
    return rows


def _floor_memory(model: torch.nn.Module, bench: Bench) -> int:
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    x = embed(bench.batch["input_ids"]).detach().requires_grad_()
    inputs = {k: v for k, v in bench.batch.items() if k != "input_ids"}

    class Floor(torch.nn.Module):
        def forward(self, **_: Any) -> Any:
            return model(inputs_embeds=x, **inputs)

    return memory(Floor(), {})


RUNNERS = {"lora": section_lora, "methods": section_methods}


# -- output -----------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (r.get(k, "") for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
            f"torch {torch.__version__}, peftkit {peftkit.__version__}, load average {os.getloadavg()[0]:.2f}, "
            f"{time.strftime('%Y-%m-%d')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random models, one repeat: a smoke test")
    parser.add_argument("--models", nargs="+", choices=["minilm", "smollm2"], default=["minilm", "smollm2"])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=8, help="interleaved timed steps per variant [8]")
    parser.add_argument("--out", help="also write the tables (Markdown) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    report = [f"# `benchmarks/perf.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "", environment(args)]
    for section in args.sections:
        rows = [row for bench in benches(args.models, args.quick) for row in RUNNERS[section](bench, repeats)]
        report += ["", f"## {section}", "", table(rows)]
        print("\n".join(report[-4:]), flush=True)
    if args.out:
        from peftkit.core.atomic import write_text

        write_text(args.out, "\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
