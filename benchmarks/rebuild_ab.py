"""LoRA and (IA)³ with their inputs rebuilt in backward (the default) against keeping them
(`core.rebuild.disabled`): step time, interleaved in one process, and training memory, counted exactly.

    .venv/bin/python benchmarks/rebuild_ab.py [--models minilm smollm2] [--methods lora ia3] [--repeats 24]
        [--threads 2] [--bf16]
    .venv/bin/python benchmarks/rebuild_ab.py --default-job 120    (the default job's own steps, paired)

Rows: LoRA r=8, alpha=16 on query and value with dropout 0.1 and 0, and on every linear layer with dropout 0;
(IA)³ with its defaults (keys, values, the FFN down projection's input). On the batches of `perf.py`
(MiniLM 32×64, SmolLM2 4×256). The rounds alternate which side runs first.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import positive  # noqa: E402
from perf import benches, memory, train_step  # noqa: E402

import peftkit  # noqa: E402
from peftkit.core import rebuild  # noqa: E402


def _side(step: Callable[[], None], rebuilt: bool, bf16: bool) -> Callable[[], None]:
    def run() -> None:
        with (contextlib.nullcontext() if rebuilt else rebuild.disabled()), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            step()
    return run


def compare(bench, config, repeats: int, bf16: bool) -> dict[str, float]:
    model = peftkit.attach(bench.make(), config).train()
    step = train_step(model, bench.batch)
    sides = {True: _side(step, True, bf16), False: _side(step, False, bf16)}
    for _ in range(2):
        sides[True](), sides[False]()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for rebuilt in ((True, False) if i % 2 else (False, True)):
            start = time.perf_counter()
            sides[rebuilt]()
            times[rebuilt].append(time.perf_counter() - start)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with rebuild.disabled():
            kept = memory(model, bench.batch)
        rebuilt_bytes = memory(model, bench.batch)
    paired = [a / b for a, b in zip(times[True], times[False], strict=True)]
    return {"time rebuilt / kept (medians)": statistics.median(times[True]) / statistics.median(times[False]),
            "time rebuilt / kept (paired)": statistics.median(paired), "step kept (s)": statistics.median(times[False]),
            "memory rebuilt / kept": rebuilt_bytes / kept, "memory rebuilt (MB)": rebuilt_bytes / 2**20,
            "memory kept (MB)": kept / 2**20}


def default_job(steps: int) -> str:
    """The default job's trainer at `--precision auto`, each of its batches run once rebuilt and once kept
    (order alternating), so that the batch length cancels: kept / rebuilt time, total and median pair."""
    from _common import default_job_trainer

    from peftkit.core.attention import dropout_attention
    from peftkit.core.dropout import fast_dropout

    trainer, _ = default_job_trainer("auto")
    times: dict[bool, list[float]] = {True: [], False: []}
    with fast_dropout(trainer.model), dropout_attention(trainer.model):
        trainer._step(0)
        for step in range(1, steps + 1):
            for rebuilt in ((True, False) if step % 2 else (False, True)):
                with contextlib.nullcontext() if rebuilt else rebuild.disabled():
                    start = time.perf_counter()
                    trainer._step(step)
                    times[rebuilt].append(time.perf_counter() - start)
    pairs = [k / r for r, k in zip(times[True], times[False], strict=True)]
    return (f"default job, {steps} steps: kept / rebuilt total {sum(times[False]) / sum(times[True]):.3f}, "
            f"median pair {statistics.median(pairs):.3f} (rebuilt {sum(times[True]):.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["minilm", "smollm2"], default=["minilm"])
    parser.add_argument("--methods", nargs="+", choices=["lora", "ia3"], default=["lora"])
    parser.add_argument("--repeats", type=positive, default=24, help="interleaved rounds per row (default 24)")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--bf16", action="store_true", help="run both sides under bfloat16 autocast")
    parser.add_argument("--quick", action="store_true", help="tiny random models, 2 rounds: a smoke run")
    parser.add_argument("--default-job", type=positive, metavar="STEPS",
                        help="instead: the default job's first STEPS steps, each batch run both ways")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.default_job is not None:
        print(default_job(args.default_job))
        return 0
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {args.threads} threads, {repeats} rounds, {'bf16' if args.bf16 else 'fp32'}")
    print("| model | method | time rebuilt / kept (medians) | (paired) | step kept (s) | memory rebuilt / kept | "
          "memory rebuilt (MB) | memory kept (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for bench in benches(args.models, args.quick):
        rows = [(f"lora {label}", peftkit.config("lora", r=8, alpha=16, dropout=dropout, targets=targets))
                for label, targets, dropout in (("q,v dropout 0.1", bench.lora_targets, 0.1),
                                                ("q,v dropout 0", bench.lora_targets, 0.0),
                                                ("all linear, dropout 0", "all-linear", 0.0))
                if "lora" in args.methods]
        if "ia3" in args.methods:
            rows.append(("ia3", peftkit.config("ia3")))
        for label, config in rows:
            row = compare(bench, config, repeats, args.bf16)
            print(f"| {bench.name} | {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
