"""Per-process memory and step time of 2-process training, ``--strategy ddp`` against ``fsdp``.

    PYTHONPATH=src python benchmarks/scale.py [--model smollm2] [--method lora] [--steps 5] [--processes 2]
                                              [--batch-size 4] [--max-length 256] [--write]

Each strategy runs as one ``torchrun --nproc_per_node N -m`` launch of this file, which calls
`peftkit.train.run.train` on the embedded chatterbot data (instruction tuning). Every process
reports its peak resident memory (``ru_maxrss``: the whole process, interpreter and libraries
included; and sampled, split into loading, up to training, and training), the bytes of parameters and buffers it holds after sharding (the model's share), CUDA's
peak allocation where there is a GPU, and the run's seconds per optimizer step (the first step
included). Under fsdp, rank 0 reads the base and the others build it on the meta device, so rank 0's
peak RSS holds one whole copy while loading; the others' hold their shards only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


class RssPhases:
    """Peak resident memory of this process before and during `Trainer.fit` (sampled every 50 ms)."""

    def __init__(self) -> None:
        import threading

        self.phase, self.peaks = "load", {"load": 0, "train": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.05):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            self.peaks[self.phase] = max(self.peaks[self.phase], rss)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from peftkit.train import trainer
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    phases = RssPhases()
    fit = trainer.Trainer.fit

    def timed_fit(self: trainer.Trainer) -> trainer.FitResult:
        phases.phase = "train"
        return fit(self)

    trainer.Trainer.fit = timed_fit

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cfg = TrainConfig(model=args.model, data="chatterbot", method=args.method, strategy=args.worker,
                      max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      max_eval_examples=8, eval_before=False, progress=False, out=args.out, overwrite=True,
                      save_every=10**6)
    result = train(cfg, echo=lambda _s: None)
    peaks = phases.stop()
    mine = {"rank": dist.get_rank(), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_rss": peaks["load"], "train_rss": peaks["train"],
            "model_bytes": result["model_bytes"], "seconds_per_step": result["train_seconds"] / result["steps"],
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        print(json.dumps({"strategy": args.worker, "ranks": every, "params": result["total_params"]}), flush=True)
    dist.destroy_process_group()


def launch(strategy: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
           "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000), __file__,
           "--worker", strategy, "--out", str(out / strategy), *_passed(args)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))


def _passed(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--method", args.method, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def table(runs: list[dict]) -> str:
    lines = ["| strategy | rank | peak RSS (MiB) | loading | training | parameters + buffers held (MiB) | "
             "CUDA peak (MiB) | s / step |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["ranks"]:
            lines.append(f"| {run['strategy']} | {r['rank']} | {_mib(r['peak_rss'])} | {_mib(r['load_rss'])} | "
                         f"{_mib(r['train_rss'])} | {_mib(r['model_bytes'])} | "
                         f"{_mib(r['cuda_peak'])} | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/scale.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [launch(strategy, args, Path(tmp)) for strategy in ("ddp", "fsdp")]
    command = "PYTHONPATH=src python benchmarks/scale.py " + " ".join(_passed(args)) + f" --processes {args.processes}"
    text = (f"# Scale: {args.processes} processes, ddp against fsdp\n\n`{command}`\n\n"
            f"{args.model} ({runs[0]['params']:,} parameters), {args.method}, batch {args.batch_size} per process, "
            f"{args.max_length} tokens, {args.steps} steps.\n\n{table(runs)}\n")
    print(text)
    if args.write:
        from peftkit.core.atomic import write_text

        write_text(ROOT / "benchmarks" / "results" / "scale.md", text)


if __name__ == "__main__":
    main()
