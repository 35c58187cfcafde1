"""What the length-sorted pool size costs a training step: the default job's trainer runs step s of each pool
size's batch order in turn (the order alternating step by step), in one process, and prints each pool's total
time and padded tokens as ratios against the first pool given.

    .venv/bin/python benchmarks/pool_steps.py [--steps 100] [--pools 4 8 16] [--threads 2] [--precision auto]

The job is `peftkit train` with no arguments (MiniLM on Rotten Tomatoes); `benchmarks/results/recipes.md` has
the figures and the accuracy of each pool size over seeds.
"""

from __future__ import annotations

import argparse
import time

import _common
import torch
from _common import positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive, default=100)
    parser.add_argument("--pools", type=positive, nargs="+", default=[4, 8, 16])
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peftkit.core.attention import dropout_attention
    from peftkit.core.dropout import fast_dropout
    from peftkit.train.batches import epoch_batches

    trainer, prepared = _common.default_job_trainer(args.precision)
    cfg = trainer.cfg
    lengths = prepared.train.lengths
    orders = {p: epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, pool=p) for p in args.pools}
    steps = min(args.steps, *(len(o) - 1 for o in orders.values()))
    seconds = dict.fromkeys(args.pools, 0.0)
    with fast_dropout(trainer.model), dropout_attention(trainer.model):
        trainer._step(0)  # warm-up
        for s in range(1, steps + 1):
            for pool in args.pools if s % 2 else args.pools[::-1]:
                trainer._batch = lambda step, pool=pool: orders[pool][step]
                start = time.perf_counter()
                trainer._step(s)
                seconds[pool] += time.perf_counter() - start

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    tokens = {p: padded(orders[p][1:steps + 1]) for p in args.pools}
    first = args.pools[0]
    print(f"{steps} steps of each order, precision {cfg.precision}, {args.threads} threads")
    print(f"| pool | time / pool {first} | padded tokens / pool {first} | padded / real tokens (epoch) |")
    print("|---|---|---|---|")
    real = int(lengths.sum())
    for p in args.pools:
        print(f"| {p} | {seconds[p] / seconds[first]:.3f} | {tokens[p] / tokens[first]:.3f} | "
              f"{padded(orders[p]) / real:.3f} |")


if __name__ == "__main__":
    main()
