"""``kill -9`` at seeded random moments, at a larger count than tests/test_crash_safety.py (same
harness: tests/crash_harness.py): adapter saves (peftkit, hf-peft and two-adapter folders) and
training checkpoints, each with renameat2 and with the two-rename fallback; and `peftkit.train` runs
killed and resumed until they complete, compared bit for bit with an uninterrupted run (CPU).

    PYTHONPATH=src python benchmarks/crash_safety.py [--kills 100] [--train-kills 30] [--seed 0] [--write]

Prints a table (and with --write puts it in benchmarks/results/crash_safety.md): kills done, copies
lost (must be 0), kills after which the path was missing and its copy aside was used, kills that
landed inside a write (left temporary files), training runs completed and those not bit-identical.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - offline settings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from crash_harness import (  # noqa: E402
    Server,
    Tally,
    adapter_version,
    checkpoint_version,
    kill_saves,
    kill_training,
)
from support import adapter_tensors, save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

from peftkit.core.atomic import write_text  # noqa: E402


def _row(name: str, tally: Tally, seconds: float) -> str:
    return (f"| {name} | {tally.kills} | {tally.lost} | {tally.missing} | {tally.mid_write} | {tally.runs or ''} | "
            f"{tally.not_identical if tally.runs else ''} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="kills per save series")
    parser.add_argument("--train-kills", type=int, default=30, help="kills of training runs, per replace mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/crash_safety.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="crash-safety-"))
    server = Server(root / "server.log")
    rows, problems = [], []
    try:
        series = [("adapter", fmt, n, fallback) for fmt, n in (("peftkit", 1), ("hf-peft", 1), ("peftkit", 2))
                  for fallback in (False, True)] + [("checkpoint", None, 1, fallback) for fallback in (False, True)]
        for writer, fmt, adapters, fallback in series:
            name = (f"{writer}{' ' + fmt if fmt else ''}{' x2' if adapters > 1 else ''}, "
                    f"{'two renames' if fallback else 'renameat2'}")
            path = root / name.replace(" ", "_").replace(",", "") / writer
            extra = {"format": fmt, "adapters": adapters} if writer == "adapter" else {}
            start = time.perf_counter()
            tally = kill_saves(server, writer, path, args.kills, rng,
                               adapter_version if writer == "adapter" else checkpoint_version, fallback=fallback,
                               **extra)
            rows.append(_row(name, tally, time.perf_counter() - start))
            problems += tally.problems
            print(rows[-1], flush=True)
        bert = save_tiny_bert(root / "bert")
        csv = write_csv(root / "data.csv", sentiment_rows())
        config = dict(model=str(bert), data=str(csv), batch_size=4, grad_accum=2, max_steps=12, lr=5e-3, save_every=2,
                      eval_every=4, method_options={"dropout": 0.1, "r": 4}, progress=False, eval_fraction=0.25, seed=1)
        pid = server.start("train", config={**config, "out": str(root / "uninterrupted")})
        done = server.expect(lambda e: "done" in e, timeout=600)
        server.wait(pid)
        reference = adapter_tensors(root / "uninterrupted" / "adapter")
        for fallback in (False, True):
            start = time.perf_counter()
            tally = kill_training(server, config, root / f"train-{fallback}", reference, args.train_kills, rng,
                                  done["t"] - server.started_at[pid], fallback=fallback)
            rows.append(_row(f"training run, {'two renames' if fallback else 'renameat2'}", tally,
                             time.perf_counter() - start))
            problems += tally.problems
            print(rows[-1], flush=True)
    finally:
        server.close()
    table = "\n".join([
        "| series | kills | lost | path missing (copy aside used) | inside a write | runs completed | "
        "not bit-identical | seconds |", "|---|---|---|---|---|---|---|---|", *rows])
    command = (f"PYTHONPATH=src python benchmarks/crash_safety.py --kills {args.kills} --train-kills "
               f"{args.train_kills} --seed {args.seed}")
    print("\n" + table + "\n\n" + command)
    for problem in problems:
        print("PROBLEM:", problem)
    if args.write:
        write_text(HERE / "results" / "crash_safety.md",
                   f"# kill -9 while saving and training\n\n`{command}`\n\n{table}\n"
                   + "".join(f"\nproblem: {p}" for p in problems) + "\n")


if __name__ == "__main__":
    main()
