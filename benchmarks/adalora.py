"""AdaLoRA on the real all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/adalora.py steptime [--repeats 8] [--threads 1]
    .venv/bin/python benchmarks/adalora.py accuracy [--seeds 0 1 2] [--methods lora adalora] [--steps 321] [--orth-reg 0.1] [--alpha 16]
    .venv/bin/python benchmarks/adalora.py summarize

``steptime``: one full training step (forward, backward, AdamW step and, for AdaLoRA, the rank
allocator's update) of peftkit AdaLoRA, peftkit LoRA at the same final rank, and peft's AdaLoRA,
interleaved in one process; prints ratios (median step time). AdaLoRA runs its budget phase
(importance update every step, masking every `delta_t`), the expensive part of its schedule.

``accuracy``: AdaLoRA (init_r 8 → average 4) against LoRA r=4, an equal final parameter count, on
Rotten Tomatoes through ``peftkit train`` (`--steps` of `--batch-size`: one epoch of 32 by default), for
each seed; appends to <out>/results.jsonl and prints held-out accuracy as mean ± std
(``summarize`` reprints it, e.g. after runs split over two processes). ``--alpha`` sets AdaLoRA's
alpha (default 2 × init_r, scale 2 like LoRA's). With orth_reg > 0 and a few hundred steps scale 2 learns
too slowly: P and Q are held orthonormal and only Λ grows, about lr per step (seed 0, 200 steps of 16, lr 3e-3:
0.588 at alpha 16 — peft's AdaLoRA 0.600 — against 0.754 at alpha 64, peft 0.750), so compare at ``--alpha 64``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from _common import interleaved_median, load_minilm, minilm_batch

import peftkit

STEPS_PER_EPOCH = 321  # Rotten Tomatoes train split (10,262) at batch 32, as `peftkit train` reports


def steptime(args: argparse.Namespace) -> None:
    from peft import AdaLoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    total = 10_000  # a long schedule: every timed step is in the budget phase
    common = {"init_r": args.init_r, "target_r": args.target_r, "total_steps": total, "t_init": 0, "t_final": 10,
              "delta_t": 10}
    models = {
        "adalora": peftkit.attach(load_minilm(), peftkit.config("adalora", **common)).train(),
        "lora": peftkit.attach(load_minilm(), peftkit.config("lora", r=args.target_r, alpha=8)).train(),
        "peft-adalora": get_peft_model(load_minilm(), AdaLoraConfig(
            init_r=args.init_r, target_r=args.target_r, total_step=total, tinit=0, tfinal=10, deltaT=10,
            target_modules=["query", "value"], task_type="SEQ_CLS", orth_reg_weight=0.1)).train(),
    }
    batch = minilm_batch()
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    counters = dict.fromkeys(models, 0)
    updates = {"adalora": lambda m, s: m.update(s), "lora": lambda m, s: m.update(s),
               "peft-adalora": lambda m, s: m.base_model.update_and_allocate(s)}

    def step(name: str):
        def run() -> None:
            model, optimizer = models[name], optimizers[name]
            model(**batch).loss.backward()
            optimizer.step()
            updates[name](model, counters[name])
            optimizer.zero_grad(set_to_none=True)
            counters[name] += 1
        return run

    times = interleaved_median({k: step(k) for k in models}, repeats=args.repeats)
    print(f"MiniLM, batch 32x64, init_r={args.init_r}, target_r={args.target_r}, threads={args.threads}, "
          f"median of {args.repeats} interleaved steps")
    for name, seconds in times.items():
        print(f"  {name:<13} {seconds * 1000:8.0f} ms/step")
    print(f"  peftkit adalora / peftkit lora: {times['adalora'] / times['lora']:.3f}")
    print(f"  peftkit adalora / peft adalora: {times['adalora'] / times['peft-adalora']:.3f}")


def run_cli(method: str, options: str, seed: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "peftkit", "train", "--method", method, "--method-options", options,
           "--seed", str(seed), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--threads", str(args.threads), "--no-progress", "--no-eval-before",
           "--out", str(Path(args.out) / f"{method}-s{seed}"), "--overwrite", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace) -> dict[str, str]:
    t_init, t_final = args.steps // 10, args.steps // 5
    alpha = args.alpha if args.alpha is not None else 2 * args.init_r
    return {
        "lora": f"r={args.target_r},alpha={2 * args.target_r},targets=[query,value]",  # AdaLoRA's sites
        "adalora": (f"init_r={args.init_r},target_r={args.target_r},alpha={alpha:g},"
                    f"total_steps={args.steps},t_init={t_init},t_final={t_final},delta_t={max(1, args.steps // 20)},"
                    f"orth_reg={args.orth_reg}"),
    }


def accuracy(args: argparse.Namespace) -> None:
    runs = plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            result = run_cli(method, runs[method], seed, args)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps({"method": method, "seed": seed, "options": runs[method], "lr": args.lr,
                                    "batch_size": args.batch_size, **result}) + "\n")
            print(f"  {method:<8} seed {seed}: accuracy {result['metrics']['accuracy']:.4f} "
                  f"({result['train_seconds']:.0f} s)", flush=True)
    summarize(args)


def summarize(args: argparse.Namespace) -> None:
    """Mean ± std of every method in <out>/results.jsonl (runs may have been split over processes)."""
    sites, width = 12, 384 + 384  # query and value of MiniLM's 6 layers, in + out
    finals = {"lora": sites * args.target_r * width, "adalora": sites * args.target_r * (width + 1)}
    rows = [json.loads(line) for line in (Path(args.out) / "results.jsonl").read_text().splitlines() if line]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["options"], r["lr"], r["batch_size"], r["steps"]), []).append(r)
    for (method, options, lr, batch_size, steps), mine in sorted(groups.items(), key=lambda kv: kv[0][0] != "lora"):
        accs = [r["metrics"]["accuracy"] for r in sorted(mine, key=lambda r: r["seed"])]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{method:<8} final adapter params {finals[method]:,} (+ head): accuracy {statistics.mean(accs):.4f} "
              f"± {spread:.4f} (n={len(accs)}: {', '.join(f'{a:.4f}' for a in accs)}; {steps} steps of {batch_size}, "
              f"lr {lr})  [{options}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("steptime", "accuracy", "summarize"):
        p = sub.add_parser(name)
        p.add_argument("--init-r", type=int, default=8)
        p.add_argument("--target-r", type=int, default=4)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", default="/tmp/peftkit-adalora-accuracy")
    sub.choices["steptime"].add_argument("--repeats", type=int, default=8)
    sub.choices["accuracy"].add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sub.choices["accuracy"].add_argument("--methods", nargs="+", choices=["lora", "adalora"], default=["lora", "adalora"])
    sub.choices["accuracy"].add_argument("--steps", type=int, default=STEPS_PER_EPOCH)
    sub.choices["accuracy"].add_argument("--batch-size", type=int, default=32)
    sub.choices["accuracy"].add_argument("--lr", type=float, default=1e-3)
    sub.choices["accuracy"].add_argument("--orth-reg", type=float, default=0.1)
    sub.choices["accuracy"].add_argument("--alpha", type=float, default=None,
                                         help="AdaLoRA's alpha (default 2 x init_r: scale 2, LoRA's)")
    args = parser.parse_args()
    {"steptime": steptime, "accuracy": accuracy, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()
