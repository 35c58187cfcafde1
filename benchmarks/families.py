"""Partial, hybrid and unified methods against LoRA on the real all-MiniLM-L6-v2: training step
time, training memory and adapter file size, each as a ratio to LoRA (r=8 on query/value) measured
in the same process.

    nice .venv/bin/python benchmarks/families.py [--repeats 6] [--threads 2] [--methods bitfit,mam,...]

Training memory = bytes autograd saves for backward in one step (exact, see `_common.py`) + the
trainable state (each trainable tensor, its gradient and AdamW's two moments: 4 × fp32). The base
weights are shared by every method and left out. Step time: fwd + bwd + AdamW step, batch 32×48,
interleaved runs, median. SNIP-scored sparse adapters are calibrated on two synthetic batches.

    nice .venv/bin/python benchmarks/families.py train --method sparse_adapter --method-options ...

runs ``peftkit train`` with the given flags, first calibrating data-scored adapters (SNIP / GraSP
masks) on the first 4 training batches — for as long as ``peftkit train`` does not do it itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from _common import interleaved_median, load_minilm, minilm_batch, saved_activation_bytes

import peftkit

DENSE_ADAPTER = {"bottleneck": 64}
CASES: dict[str, dict] = {
    "lora": {"method": "lora", "r": 8, "alpha": 16},
    "bitfit": {"method": "bitfit"},
    "ln_tuning": {"method": "ln_tuning"},
    "layer_tuning": {"method": "layer_tuning"},
    "compose(lora+bitfit+ln)": {"method": "compose", "parts": [{"method": "lora"}, {"method": "bitfit"},
                                                               {"method": "ln_tuning"}]},
    "mam": {"method": "mam"},
    "unipelt": {"method": "unipelt"},
    "adapter m=64": {"method": "adapter", **DENSE_ADAPTER},
    "sparse_adapter m=64 40%": {"method": "sparse_adapter", "base_options": DENSE_ADAPTER, "sparsity": 0.4},
    "sparse_adapter m=64 80%": {"method": "sparse_adapter", "base_options": DENSE_ADAPTER, "sparsity": 0.8},
    "large-sparse m=320 80%": {"method": "sparse_adapter", "base_options": {"bottleneck": 320}, "sparsity": 0.8},
}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def build(options: dict) -> peftkit.TunedModel:
    tuned = peftkit.attach(load_minilm(), peftkit.config(options)).train()
    if tuned.needs_calibration:
        tuned.calibrate([minilm_batch(32, 48, seed=s) for s in (1, 2)])
    return tuned


def train_calibrated(argv: list[str], batches: int = 4) -> int:
    """`peftkit train` with SNIP / GraSP masks scored on the first `batches` training batches."""
    from peftkit.cli import main as cli_main
    from peftkit.train import run
    from peftkit.train.batches import collate, epoch_batches

    prepare = run._prepare

    def prepare_and_calibrate(job, dist):
        tok, prepared, tuned = prepare(job, dist)
        if tuned.needs_calibration:
            enc, cfg = prepared.train, job.cfg
            order = epoch_batches(enc.lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length,
                                  min_size=1)
            device = next(tuned.parameters()).device
            data = [{k: v.to(device) for k, v in collate(enc, idx, tok.pad_token_id).items()} for idx in order[:batches]]
            print(f"  calibrated {tuned.calibrate(data)} on {len(data)} training batches", flush=True)
        return tok, prepared, tuned

    run._prepare = prepare_and_calibrate
    return cli_main(["train", *argv])


def main() -> None:
    if sys.argv[1:2] == ["train"]:
        raise SystemExit(train_calibrated(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated case names (lora always runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["lora"] + [n for n in args.methods.split(",") if n in CASES and n != "lora"]
    batch = minilm_batch(32, 48)
    models = {n: build(CASES[n]) for n in names}
    optimizers = {n: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for n, m in models.items()}

    def step(name: str):
        def run() -> None:
            optimizers[name].zero_grad(set_to_none=True)
            models[name](**batch).loss.backward()
            optimizers[name].step()
        return run

    seconds = interleaved_median({n: step(n) for n in names}, repeats=args.repeats)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, tuned in models.items():
            activations = saved_activation_bytes(lambda t=tuned: t(**batch).loss)
            summary = tuned.summary()
            state = 16 * summary.trainable
            folder = os.path.join(tmp, f"adapter{len(rows)}")
            tuned.save(folder)
            rows[n] = (summary, seconds[n], activations + state, folder_bytes(folder))
    base = rows["lora"]
    print(f"all-MiniLM-L6-v2 (22.7M), batch 32x48, {args.threads} threads, median of {args.repeats} interleaved steps;"
          " ratios to LoRA r=8 q/v")
    print(f"{'method':26}{'trainable':>11}{'% base':>8}{'step s':>8}{'x LoRA':>8}{'train MB':>10}{'x LoRA':>8}"
          f"{'file KB':>10}{'x LoRA':>8}")
    for n, (summary, sec, mem, size) in rows.items():
        print(f"{n:26}{summary.trainable:>11,}{summary.trainable_percent:>8.3f}{sec:>8.3f}{sec / base[1]:>8.2f}"
              f"{mem / 2**20:>10.1f}{mem / base[2]:>8.2f}{size / 1024:>10.1f}{size / base[3]:>8.2f}")


if __name__ == "__main__":
    main()
