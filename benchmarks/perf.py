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
- ``peers`` — the methods `peft` also has (prompt tuning, prefix tuning, (IA)³) against `peft`'s.
- ``checkpointing`` — every method with and without gradient checkpointing: memory and step time.
- ``compile`` — ``torch.compile`` (inductor) against eager for LoRA, (IA)³, adapters, prefix tuning:
  training step and inference, and how long the first compiled call took.
- ``causal`` — the causal-LM loss in vocabulary chunks against the model's own (full logits), LoRA.
- ``inference`` — latency of LoRA merged and unmerged against the base model, and one batch of 8
  requests for 8 different adapters (routed per row) against the 8 run one by one.
- ``precision`` — ``--precision bf16`` (bfloat16 base weights, bfloat16 autocast, float32 adapters)
  against float32, LoRA on every linear layer (the trainer's default): step time, memory, inference latency, and the loss after
  the same steps from the same start (30 on MiniLM, 10 on SmolLM2); `peft` under the same autocast over its float32 base as the
  peer. Only on hardware with native bfloat16 (elsewhere the row says so).

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

SECTIONS = ("lora", "methods", "peers", "checkpointing", "compile", "causal", "inference", "precision")
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
    quick: bool = False


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
        out.append(Bench(name, make, _random_batch(vocab, *shape, causal), causal, targets, quick))
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


def _attach(bench: Bench, method: str, **options: Any) -> peftkit.TunedModel:
    tuned = peftkit.attach(bench.make(), peftkit.config(method, **{**REQUIRED.get(method, {}), **options}))
    if tuned.needs_calibration:
        tuned.calibrate([bench.batch])
    return tuned.train()


PEERS = {"prompt_tuning": ("PROMPT_TUNING", {"num_virtual_tokens": 20}),
         "prefix_tuning": ("PREFIX_TUNING", {"num_virtual_tokens": 20}), "ia3": ("IA3", {})}


def section_peers(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    import peft

    rows = []
    for method, (peer, options) in PEERS.items():
        ours = _attach(bench, method, **options)
        config = getattr(peft, {"PROMPT_TUNING": "PromptTuningConfig", "PREFIX_TUNING": "PrefixTuningConfig",
                                "IA3": "IA3Config"}[peer])
        theirs = peft.get_peft_model(bench.make(), config(task_type="CAUSAL_LM" if bench.causal else "SEQ_CLS",
                                                          **options)).train()
        try:
            train_step(theirs, bench.batch)()
        except Exception as err:  # noqa: BLE001 - a peer that cannot run this model is a finding, not a crash
            rows.append({"model": bench.name, "method": method, "note": f"peft: {str(err)[:80]}"})
            continue
        times = interleaved_median({"floor": floor_step(bench), "peftkit": train_step(ours, bench.batch),
                                    "peft": train_step(theirs, bench.batch)}, repeats=repeats)
        rows.append({"model": bench.name, "method": method, "peftkit / floor": times["peftkit"] / times["floor"],
                     "peft / floor": times["peft"] / times["floor"], "peftkit / peft (time)": times["peftkit"] / times["peft"],
                     "peftkit / peft (memory)": memory(ours, bench.batch) / memory(theirs, bench.batch)})
    return rows


def section_checkpointing(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for method in peftkit.methods():
        try:
            plain, checkpointed = _attach(bench, method), _attach(bench, method)
        except peftkit.PeftkitError as err:
            rows.append({"model": bench.name, "method": method, "note": str(err).split(";")[0][:80]})
            continue
        checkpointed.gradient_checkpointing_enable()
        times = interleaved_median({"plain": train_step(plain, bench.batch),
                                    "checkpointed": train_step(checkpointed, bench.batch)}, repeats=repeats)
        rows.append({"model": bench.name, "method": method,
                     "memory checkpointed / plain": memory(checkpointed, bench.batch) / memory(plain, bench.batch),
                     "step checkpointed / plain": times["checkpointed"] / times["plain"],
                     "memory plain (MB)": memory(plain, bench.batch) / 2**20})
    return rows


def _inference_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with torch.no_grad():
            model(**inputs, **extra)

    return step


COMPILED = (("lora", {}), ("ia3", {}), ("adapter", {}), ("prefix_tuning", {}))


def section_compile(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for method, options in COMPILED[:1] if bench.quick else COMPILED:
        torch._dynamo.reset()
        eager, tuned = _attach(bench, method, **options), _attach(bench, method, **options)
        compiled = torch.compile(tuned)
        start = time.perf_counter()
        train_step(compiled, bench.batch)()
        first = time.perf_counter() - start
        train = interleaved_median({"eager": train_step(eager, bench.batch),
                                    "compiled": train_step(compiled, bench.batch)}, repeats=repeats)
        eager.eval(), tuned.eval()
        infer = interleaved_median({"eager": _inference_step(eager, bench.batch),
                                    "compiled": _inference_step(compiled, bench.batch)}, repeats=repeats)
        rows.append({"model": bench.name, "method": method, "train compiled / eager": train["compiled"] / train["eager"],
                     "inference compiled / eager": infer["compiled"] / infer["eager"],
                     "first compiled step (s)": first})
    return rows


def section_causal(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    if not bench.causal:
        return []
    from peftkit.train.vocab_loss import VocabLoss

    tuned = _attach(bench, "lora", targets="all-linear")  # as the peer below, and as the trainer trains
    vocab = VocabLoss(tuned)
    assert vocab.usable and vocab.probe(tuned, bench.batch), "the chunked loss does not apply to this model"
    theirs = peft_model(bench, "all-linear", 0.0).train()

    def chunked() -> torch.Tensor:
        return vocab.loss(tuned, bench.batch)[1]

    def step(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: loss().backward()

    times = interleaved_median({"own": step(lambda: tuned(**bench.batch).loss), "chunked": step(chunked),
                                "peft": step(lambda: theirs(**bench.batch).loss)}, repeats=repeats)
    saved = {"own": saved_activation_bytes(lambda: tuned(**bench.batch).loss), "chunked": saved_activation_bytes(chunked),
             "peft": saved_activation_bytes(lambda: theirs(**bench.batch).loss)}
    return [{"model": bench.name, "lora (all linear)": "chunked loss", "time / own loss": times["chunked"] / times["own"],
             "time / peft": times["chunked"] / times["peft"], "saved / own loss": saved["chunked"] / saved["own"],
             "saved / peft": saved["chunked"] / saved["peft"], "saved chunked (MB)": saved["chunked"] / 2**20,
             "saved own (MB)": saved["own"] / 2**20}]


def section_inference(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    def lora(model: torch.nn.Module, name: str = "default", seed: int = 0) -> peftkit.TunedModel:
        torch.manual_seed(seed)
        return peftkit.attach(model, peftkit.config("lora", r=8, alpha=16, targets=bench.lora_targets, init="random"),
                              name=name)

    base = bench.make().eval()
    unmerged = lora(bench.make()).eval()
    merged = lora(bench.make()).merge().eval()
    latency = interleaved_median({"base": _inference_step(base, bench.batch), "merged": _inference_step(merged, bench.batch),
                                  "unmerged": _inference_step(unmerged, bench.batch)}, repeats=repeats)
    rows = [{"model": bench.name, "inference": "LoRA merged / base", "ratio": latency["merged"] / latency["base"]},
            {"model": bench.name, "inference": "LoRA unmerged / base", "ratio": latency["unmerged"] / latency["base"]}]
    names = [f"a{i}" for i in range(8)]
    served = lora(bench.make(), names[0])
    for i, name in enumerate(names[1:], 1):
        lora(served, name, seed=i)
    served.eval()
    requests = {k: v.repeat(-(-8 // len(v)), *([1] * (v.dim() - 1)))[:8] for k, v in bench.batch.items() if k != "labels"}

    def one_by_one() -> None:
        with torch.no_grad():
            for i, name in enumerate(names):
                served.activate(name)
                served(**{k: v[i:i + 1] for k, v in requests.items()})

    mixed = interleaved_median({"mixed": _inference_step(served, requests, adapter_names=names),
                                "one by one": one_by_one}, repeats=repeats)
    rows.append({"model": bench.name, "inference": "8 adapters, 8 requests: throughput mixed batch / one by one",
                 "ratio": mixed["one by one"] / mixed["mixed"]})
    return rows


def _autocast_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    step = train_step(model, batch)

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return run


def _loss_after(step: Callable[[], None], model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                bf16: bool) -> float:
    for _ in range(steps):
        step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return float(model(**batch).loss)


def section_precision(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    from peftkit.train.precision import native_bf16

    if not native_bf16(torch.device("cpu")):
        return [{"model": bench.name, "note": "this CPU has no native bfloat16 (AMX / AVX-512 BF16): --precision bf16 is refused"}]

    def lora(bf16: bool) -> peftkit.TunedModel:
        torch.manual_seed(0)
        base = bench.make().to(torch.bfloat16) if bf16 else bench.make()
        return peftkit.attach(base, peftkit.config("lora", targets="all-linear")).train()  # the trainer's default

    fp32, bf16 = lora(False), lora(True)
    theirs = peft_model(bench, "all-linear", 0.0).train()
    times = interleaved_median({"fp32": train_step(fp32, bench.batch), "bf16": _autocast_step(bf16, bench.batch),
                                "peft bf16": _autocast_step(theirs, bench.batch)}, repeats=repeats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mem_bf16, mem_peft = memory(bf16, bench.batch), memory(theirs, bench.batch)
    mem_fp32 = memory(fp32, bench.batch)
    steps = 2 if bench.quick else 30 if bench.name == "minilm" else 10
    fp32, bf16 = lora(False), lora(True)  # fresh, the same start
    loss32 = _loss_after(train_step(fp32, bench.batch), fp32, bench.batch, steps, bf16=False)
    loss16 = _loss_after(_autocast_step(bf16, bench.batch), bf16, bench.batch, steps, bf16=True)
    fp32.eval(), bf16.eval()
    base32, base16 = bench.make().eval(), bench.make().to(torch.bfloat16).eval()

    def bf16_inference(model: torch.nn.Module) -> Callable[[], None]:
        step = _inference_step(model, bench.batch)

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()

        return run

    infer = interleaved_median({"fp32": _inference_step(base32, bench.batch), "bf16": bf16_inference(base16)},
                               repeats=repeats)
    return [{"model": bench.name, "lora (defaults)": "bf16 / fp32", "step time": times["bf16"] / times["fp32"],
             "step time / peft bf16": times["bf16"] / times["peft bf16"], "memory": mem_bf16 / mem_fp32,
             "memory / peft bf16": mem_bf16 / mem_peft, f"loss after {steps} steps": loss16 / loss32,
             "inference latency (base)": infer["bf16"] / infer["fp32"], "fp32 step (s)": times["fp32"]}]


RUNNERS = {"lora": section_lora, "methods": section_methods, "peers": section_peers,
           "checkpointing": section_checkpointing, "compile": section_compile, "causal": section_causal,
           "inference": section_inference, "precision": section_precision}


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
