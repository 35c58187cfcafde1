"""QLoRA on SmolLM2-135M: storage, resident memory, step time; peftkit against fp32 LoRA and peft + bitsandbytes.

    nice .venv/bin/python benchmarks/quant.py                 # storage + memory + speed (about 10 min)
    nice .venv/bin/python benchmarks/quant.py --quality 60    # + held-out loss after 60 CLI training steps each

Variants (LoRA r=8, alpha=16 on all linear layers in every case):

- ``fp32-lora``   — the baseline: ``from_pretrained`` in fp32 + peftkit ``lora``;
- ``qlora``       — ``peftkit.quant.load_quantized(nf4, double quant)`` + peftkit ``qlora`` (torch kernels);
- ``qlora-bnb``   — the same with ``backend="bitsandbytes"`` kernels;
- ``peft-bnb``    — transformers ``BitsAndBytesConfig`` (nf4, double quant, fp32 compute) + peft LoRA.

Memory is what the OS reports (``VmHWM`` / ``VmRSS``), each variant in a fresh process (modules imported
first): the peak while loading until every weight is resident (transformers maps fp32 checkpoints lazily),
what stays resident after loading, and the peak over a few AdamW steps. Step time is measured
with all variants in one process, interleaved, median of repeats (ratios against fp32 LoRA).
Quality runs the CLI (``peftkit train --model smollm2 --task instruction --data chatterbot``) twice
with the same seed and data order and compares the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VARIANTS = ("fp32-lora", "qlora", "qlora-bnb", "peft-bnb")
MB = 1 << 20


def smollm2() -> str:
    from peftkit.train import assets

    return assets.model_path("smollm2")  # converts the embedded GGUF once, then cached


# -- building each variant ---------------------------------------------------------------------------
def load(variant: str, path: str) -> torch.nn.Module:
    """The base model of `variant`, loaded as that variant loads it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    if variant == "fp32-lora":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant in ("qlora", "qlora-bnb"):
        from peftkit.quant import load_quantized

        return load_quantized(path, "nf4", backend="bitsandbytes" if variant == "qlora-bnb" else "torch")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=torch.float32)


def adapt(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "peft-bnb":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    import peftkit

    method = "lora" if variant == "fp32-lora" else "qlora"
    return peftkit.attach(model, peftkit.config(method, targets="all-linear", r=8, alpha=16))


def weight_bytes(variant: str, model: torch.nn.Module) -> dict[str, float]:
    """Bytes per weight of the base's linear layers (quantization state included)."""
    if variant == "fp32-lora":
        from peftkit.core.targets import iter_sites, select

        sites = dict(iter_sites(model))
        weights = [sites[n].weight for n in select(model, "all-linear")]
        numel = sum(w.numel() for w in weights)
        return {"weights": numel, "bytes_per_param": sum(w.numel() * w.element_size() for w in weights) / numel}
    if variant in ("qlora", "qlora-bnb"):
        from peftkit.quant import footprint

        fp = footprint(model)
        return {"weights": fp.weights, "bytes_per_param": fp.bytes_per_param}
    import bitsandbytes as bnb

    numel = stored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            numel += module.in_features * module.out_features
            tensors = [module.weight.data, state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            stored += sum(t.numel() * t.element_size() for t in tensors)
    return {"weights": numel, "bytes_per_param": stored / numel}


@torch.no_grad()
def touch(model: torch.nn.Module) -> None:
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.sum()


def batch(size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- workers (one fresh process each) -------------------------------------------------------------------
def memory_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from peftkit.quant import memory

    path = smollm2()
    if variant == "peft-bnb":
        import bitsandbytes  # noqa: F401  - its import is not what is measured
        import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  - module imports are the same for all

    import peftkit  # noqa: F401

    memory.release(collect=True)
    memory.reset_peak_rss()
    start = memory.rss_bytes()
    t0 = time.perf_counter()
    model = load(variant, path)
    touch(model)  # transformers maps fp32 checkpoints lazily: a loaded model is one whose weights are resident
    load_seconds = time.perf_counter() - t0
    memory.release(collect=True)
    load_peak, held = memory.peak_rss_bytes(), memory.rss_bytes()
    info = weight_bytes(variant, model)
    tuned = adapt(variant, model)
    tuned.train()
    optimizer = torch.optim.AdamW(trainable(tuned), lr=1e-4)
    memory.reset_peak_rss()
    inputs = batch(args.batch, args.length)
    for _ in range(args.mem_steps):
        train_step(tuned, optimizer, inputs)
    return {"variant": variant, "rss_after_imports_mb": start / MB, "load_peak_mb": load_peak / MB,
            "held_after_load_mb": held / MB, "train_peak_mb": memory.peak_rss_bytes() / MB,
            "load_seconds": round(load_seconds, 1), **info}


def speed_worker(args: argparse.Namespace) -> dict[str, Any]:
    from _common import interleaved_median

    path = smollm2()
    inputs = batch(args.batch, args.length)
    steps = {}
    for variant in args.variants:
        model = adapt(variant, load(variant, path))
        model.train()
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        steps[variant] = (lambda m=model, o=optimizer: train_step(m, o, inputs))
    seconds = interleaved_median(steps, repeats=args.repeats, warmup=1)
    base = seconds.get("fp32-lora")
    return {v: {"step_seconds": round(s, 3), "vs_fp32_lora": round(s / base, 3) if base else None}
            for v, s in seconds.items()}


def quality_runs(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out loss after the same CLI training steps: fp32 LoRA (all linear) against qlora."""
    out = {}
    common = ["--model", "smollm2", "--task", "instruction", "--data", "chatterbot", "--max-steps", str(args.quality),
              "--batch-size", str(args.batch), "--max-length", str(args.length), "--seed", "0", "--lr", str(args.quality_lr),
              "--threads", str(args.threads), "--no-progress", "--json"]
    runs = {"fp32-lora": ["--method", "lora", "--method-options", "targets=all-linear,r=8,alpha=16"],
            "qlora": ["--method", "qlora", "--method-options", "r=8,alpha=16"]}
    procs = {}
    for name, extra in runs.items():  # side by side: the same conditions for both
        cmd = [sys.executable, "-m", "peftkit", "train", *common, *extra, "--out", str(Path(args.runs) / name),
               "--overwrite"]
        print("$", " ".join(cmd[1:]), flush=True)
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{name} quality run failed (exit {proc.returncode})")
        result = json.loads(stdout.strip().splitlines()[-1])
        out[name] = {"loss_before": result["metrics_before"].get("loss"), "loss_after": result["metrics"]["loss"],
                     "train_seconds": result["train_seconds"]}
    out["qlora_vs_fp32_loss"] = round(out["qlora"]["loss_after"] / out["fp32-lora"]["loss_after"], 4)
    return out


def _child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *extra, "--batch", str(args.batch), "--length", str(args.length),
           "--mem-steps", str(args.mem_steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--variants", *args.variants]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> None:
    mem = results.get("memory", {})
    base = mem.get("fp32-lora")
    print(f"\n{'variant':<11} {'bytes/param':>11} {'load peak MB':>13} {'held MB':>8} {'train peak MB':>14} "
          f"{'step s':>7} {'step vs fp32':>12}")
    for v, m in mem.items():
        s = results.get("speed", {}).get(v, {})
        ratio = lambda key, m=m: f"({m[key] / base[key]:.2f}x)" if base else ""  # noqa: E731
        print(f"{v:<11} {m['bytes_per_param']:>11.4f} {m['load_peak_mb']:>6.0f} {ratio('load_peak_mb'):>6} "
              f"{m['held_after_load_mb']:>8.0f} {m['train_peak_mb']:>6.0f} {ratio('train_peak_mb'):>7} "
              f"{s.get('step_seconds', float('nan')):>7.2f} {s.get('vs_fp32_lora') or float('nan'):>12.2f}")
    if base:
        print(f"(RSS after imports, before loading: {base['rss_after_imports_mb']:.0f} MB; peaks are whole-process)")
    if "quality" in results:
        q = results["quality"]
        print(f"held-out loss before: fp32 {q['fp32-lora']['loss_before']:.4f}, NF4 {q['qlora']['loss_before']:.4f}; "
              f"after the same steps: fp32 LoRA {q['fp32-lora']['loss_after']:.4f}, "
              f"qlora {q['qlora']['loss_after']:.4f} (ratio {q['qlora_vs_fp32_loss']:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["memory", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mem-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--quality", type=int, default=0, help="also train N CLI steps per method and compare loss")
    parser.add_argument("--quality-lr", type=float, default=1e-3, help="learning rate of the quality runs")
    parser.add_argument("--quality-only", action="store_true", help="skip memory and speed")
    parser.add_argument("--runs", default="runs/bench-quant", help="output folder of the quality runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.variant, args)))
        return
    if args.worker == "speed":
        print(json.dumps(speed_worker(args)))
        return
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "variant")}}
    if not args.quality_only:
        results["memory"] = {v: _child(args, "--worker", "memory", "--variant", v) for v in args.variants}
        print(json.dumps(results["memory"], indent=1), flush=True)
        results["speed"] = _child(args, "--worker", "speed")
    if args.quality:
        results["quality"] = quality_runs(args)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
