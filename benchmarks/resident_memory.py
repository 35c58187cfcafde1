"""Where the default job's resident memory goes: runs the first steps of `peftkit train` (no arguments: MiniLM
on Rotten Tomatoes) in its own batch order, or one batch over and over, and prints the process's resident
memory as it climbs, its peak, what glibc's ``malloc_trim`` gives back at the end, and the page faults and
system time the run took.

    .venv/bin/python benchmarks/resident_memory.py [--steps 330] [--same-batch] [--trim-every K]
                                                   [--threads 2] [--precision auto]

oneDNN's primitive cache (bf16 products compile a kernel per shape) is set from the environment before the
process starts, and its kernel creations are counted from its verbose log:

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 .venv/bin/python benchmarks/resident_memory.py
    ONEDNN_VERBOSE=profile_create .venv/bin/python benchmarks/resident_memory.py | grep -c cache_miss

Memory is a property of the process, so each setting is its own run; the times printed are one process's
and move with the machine's load. Figures: `benchmarks/results/perf.md` ("fifth session").
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time

import _common
import torch
from _common import positive


def resident_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise SystemExit("this benchmark reads /proc/self/status, which only Linux has")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive, default=330)
    parser.add_argument("--same-batch", action="store_true", help="repeat the first batch instead of the epoch's order")
    parser.add_argument("--trim-every", type=positive, help="call malloc_trim(0) after every K steps")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6")

    from peftkit.core.attention import dropout_attention
    from peftkit.core.dropout import fast_dropout

    trainer, _ = _common.default_job_trainer(args.precision)
    steps = min(args.steps, trainer.total_steps)
    peak, trim_seconds, marks = 0, 0.0, {1, 40, 120, 320, steps}
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with fast_dropout(trainer.model), dropout_attention(trainer.model):
        for s in range(steps):
            trainer._step(0 if args.same_batch else s)
            peak = max(peak, resident_mb())
            if s + 1 in marks:
                print(f"after step {s + 1}: {resident_mb()} MB resident", flush=True)
            if args.trim_every and (s + 1) % args.trim_every == 0:
                t = time.perf_counter()
                libc.malloc_trim(0)
                trim_seconds += time.perf_counter() - t
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    end = resident_mb()
    libc.malloc_trim(0)
    print(f"{steps} steps ({'one batch repeated' if args.same_batch else 'the epoch order'}), precision "
          f"{trainer.cfg.precision}, {args.threads} threads, trim every {args.trim_every or 'never'}")
    print(f"peak {peak} MB, end {end} MB, after malloc_trim(0) {resident_mb()} MB")
    print(f"{seconds:.1f} s ({trim_seconds:.2f} s trimming), {after.ru_minflt - before.ru_minflt:,} minor page faults, "
          f"{after.ru_stime - before.ru_stime:.1f} s system time")


if __name__ == "__main__":
    main()
