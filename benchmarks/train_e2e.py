"""A main job end to end: `peftkit train` against the same job written with `transformers.Trainer` +
`peft` (same model, data and split, LoRA config, optimiser, schedule, batch size, steps, max length,
evaluation before and after, adapter saved at the end).

    .venv/bin/python benchmarks/train_e2e.py [--job default|instruction] [--seeds 0 1 2] [--repeats 1]
                                             [--max-steps N] [--threads N]
                                             [--hf-group-by-length] [--peftkit-random-batches]
                                             [--precision auto|fp32|bf16]

Jobs: ``default`` is `peftkit train` with no arguments (all-MiniLM-L6-v2 classifying Rotten Tomatoes);
``instruction`` is ``peftkit train --model smollm2 --data chatterbot`` (SmolLM2-135M, loss on the
response), where the HF side trains on exactly the token sequences peftkit's data preparation makes,
so the two differ only in the training engine. Each side's peak resident memory is its process's
``ru_maxrss``.

Each side runs as a fresh process (imports, model load, tokenisation, eval before, training,
eval after, saving: the whole job), alternating peftkit / HF, and the wall times are compared as
a ratio (peftkit / HF; < 1 is faster) with the held-out accuracy of both. Both sides get the
same torch thread count. The HF script uses dynamic padding (DataCollatorWithPadding), as the
usual Trainer recipe does; ``--hf-group-by-length`` also gives it length-grouped batches, and
``--peftkit-random-batches`` takes them away from peftkit (``--no-group-by-length``), so both sides
can be compared with the same batching either way. ``--precision`` sets both sides' arithmetic:
peftkit gets ``--precision`` as given; the Trainer gets ``bf16=True`` (autocast over its float32 model)
whenever that resolves to bf16 on this machine (``auto``: where the CPU has native bfloat16).
One seed's accuracy moves by about ±0.005 on this split (1 % of 2,490 held-out snippets is 25 of them), so ``--seeds`` runs both sides on each seed and
compares the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def default_job() -> tuple[object, object]:
    """The default job's resolved settings and LoRA config, read from peftkit so both sides match."""
    import peftkit
    from peftkit.train.config import TrainConfig

    cfg = TrainConfig(task="classification").resolved()
    return cfg, peftkit.config(cfg.method, **cfg.method_options)


INSTRUCTION = ["--model", "smollm2", "--data", "chatterbot"]


def _fit(trainer: object, model: object, out: str) -> tuple[dict, dict, float]:
    """(metrics before, metrics after, training seconds) of the Trainer's job; the adapter saved under `out`."""
    before = trainer.evaluate()
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    after = trainer.evaluate()
    model.save_pretrained(os.path.join(out, "adapter"))
    return before, after, train_seconds


def hf_instruction_job(out: str, threads: int, max_steps: int | None, group_by_length: bool, seed: int,
                       bf16: bool) -> dict:
    """The instruction job with transformers.Trainer + peft, on peftkit's own token sequences."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.utils import logging

    import peftkit
    from peftkit.train import data as data_mod
    from peftkit.train import models, run
    from peftkit.train.config import TrainConfig

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    job = run.plan(TrainConfig(model="smollm2", data="chatterbot", seed=seed))
    cfg, tok = job.cfg, models.tokenizer(job.model_path)
    prepared = data_mod.prepare(cfg, tok, job.task, job.source, job.eval_source)

    def rows(enc: data_mod.Encoded) -> list[dict]:
        out = []
        for i in range(len(enc)):
            a, b = int(enc.offsets[i]), int(enc.offsets[i + 1])
            ids = enc.ids[a:b].tolist()
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": enc.labels[a:b].tolist()})
        return out

    lora = peftkit.config(cfg.method, **cfg.method_options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(job.model_path)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.targets, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out, learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, num_train_epochs=cfg.epochs, max_steps=max_steps or -1,
        warmup_steps=cfg.warmup, lr_scheduler_type=cfg.schedule, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=seed, data_seed=seed, save_strategy="no", report_to=[],
        logging_steps=50, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random", bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=rows(prepared.train), eval_dataset=rows(prepared.eval),
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    before, after, train_seconds = _fit(trainer, model, out)
    return {"metrics": {"loss": after["eval_loss"]}, "metrics_before": {"loss": before["eval_loss"]},
            "train_seconds": train_seconds, "steps": trainer.state.global_step,
            "job_seconds": time.perf_counter() - start}


def hf_job(out: str, threads: int, max_steps: int | None, group_by_length: bool, seed: int, bf16: bool) -> dict:
    """The job with transformers.Trainer + peft; returns the same fields as `peftkit train --json`."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging

    from peftkit.train import assets

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = assets.model_path("minilm")
    ds = assets.rotten_tomatoes()
    tok = AutoTokenizer.from_pretrained(path)
    train = [r for r, held in zip(ds.records, ds.split, strict=True) if not held]
    test = [r for r, held in zip(ds.records, ds.split, strict=True) if held]

    def encode(rows: list[dict]) -> list[dict]:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=default_job()[0].max_length)
        return [{"input_ids": ids, "attention_mask": m, "labels": r["label"]}
                for ids, m, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)]

    train_set, test_set = encode(train), encode(test)
    cfg, lora = default_job()
    cfg.seed = seed
    targets = ["query", "value"] if lora.targets is None else lora.targets
    targets = list(targets) if isinstance(targets, tuple) else targets  # peft: a list, or "all-linear"
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=targets, task_type="SEQ_CLS"))

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=out, learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, num_train_epochs=cfg.epochs, max_steps=max_steps or -1,
        warmup_steps=cfg.warmup, lr_scheduler_type=cfg.schedule, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, save_strategy="no", report_to=[],
        logging_steps=50, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random", bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    before, after, train_seconds = _fit(trainer, model, out)
    return {"metrics": {"accuracy": after["eval_accuracy"], "loss": after["eval_loss"]},
            "metrics_before": {"accuracy": before["eval_accuracy"]}, "train_seconds": train_seconds,
            "steps": trainer.state.global_step, "job_seconds": time.perf_counter() - start}


def resolved_precision(precision: str) -> str:
    """What `precision` means on this machine's CPU (peftkit's own rule, so both sides agree)."""
    import torch

    from peftkit.train.precision import resolve

    return resolve(precision, torch.device("cpu"))


def run_side(side: str, threads: int, max_steps: int | None, group_by_length: bool,
             random_batches: bool = False, seed: int = 0, job: str = "default",
             precision: str = "auto") -> tuple[float, dict]:
    """(wall seconds, the side's JSON result with ``peak_rss_mb`` added) of one fresh process."""
    out = tempfile.mkdtemp(prefix=f"e2e-{side}-")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if side == "peftkit":
        cmd = [sys.executable, "-m", "peftkit", "train", "--out", out, "--threads", str(threads), "--no-progress",
               "--json", "--seed", str(seed), "--precision", precision]
        cmd += ["--max-steps", str(max_steps)] if max_steps else []
        cmd += (["--no-group-by-length"] if random_batches else []) + (INSTRUCTION if job == "instruction" else [])
    else:
        cmd = [sys.executable, __file__, "--side", "hf", "--job", job, "--out", out, "--threads", str(threads),
               "--seed", str(seed), "--precision", precision]
        cmd += (["--max-steps", str(max_steps)] if max_steps else []) + (["--hf-group-by-length"] if group_by_length else [])
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        stdout.seek(0), stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{side} failed:\n{stderr.read()[-3000:]}")
        result = json.loads(stdout.read().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["default", "instruction"], default="default",
                        help="default: MiniLM on Rotten Tomatoes; instruction: SmolLM2 on chatterbot [default]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run both sides on each seed [0]")
    parser.add_argument("--repeats", type=int, default=1, help="runs per seed and side")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=None, help="shorter runs (default: the full epoch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hf-group-by-length", action="store_true")
    parser.add_argument("--peftkit-random-batches", action="store_true", help="peftkit without length grouping")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="both sides' arithmetic (see above) [auto]")
    parser.add_argument("--side", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "hf":
        job = hf_instruction_job if args.job == "instruction" else hf_job
        print(json.dumps(job(args.out, args.threads, args.max_steps, args.hf_group_by_length, args.seed,
                             resolved_precision(args.precision) == "bf16")))
        return
    runs: dict[str, list[tuple[float, dict]]] = {"peftkit": [], "hf": []}
    metric = "loss" if args.job == "instruction" else "accuracy"
    jobs = [seed for seed in args.seeds for _ in range(args.repeats)]
    for i, seed in enumerate(jobs):
        order = ("peftkit", "hf") if i % 2 == 0 else ("hf", "peftkit")
        for side in order:
            wall, result = run_side(side, args.threads, args.max_steps, args.hf_group_by_length,
                                    args.peftkit_random_batches, seed, args.job, args.precision)
            runs[side].append((wall, result))
            print(json.dumps({"side": side, "seed": seed, "wall_s": round(wall, 1),
                              "train_s": round(result["train_seconds"], 1), "steps": result["steps"],
                              metric: round(result["metrics"][metric], 4),
                              "peak_rss_mb": round(result["peak_rss_mb"])}), flush=True)
    walls = {s: statistics.median(w for w, _ in r) for s, r in runs.items()}
    trains = {s: statistics.median(x["train_seconds"] for _, x in r) for s, r in runs.items()}
    accs = {s: statistics.mean(x["metrics"][metric] for _, x in r) for s, r in runs.items()}
    peaks = {s: statistics.median(x["peak_rss_mb"] for _, x in r) for s, r in runs.items()}
    print(json.dumps({
        "job": args.job,
        "wall_ratio_peftkit_over_hf": round(walls["peftkit"] / walls["hf"], 3),
        "peak_rss_ratio_peftkit_over_hf": round(peaks["peftkit"] / peaks["hf"], 3),
        "peak_rss_mb": {k: round(v) for k, v in peaks.items()},
        "train_ratio_peftkit_over_hf": round(trains["peftkit"] / trains["hf"], 3),
        "wall_s": {k: round(v, 1) for k, v in walls.items()},
        "train_s": {k: round(v, 1) for k, v in trains.items()},
        f"mean_{metric}": {k: round(v, 4) for k, v in accs.items()},
        "threads": args.threads, "seeds": args.seeds, "repeats": args.repeats, "hf_group_by_length": args.hf_group_by_length,
        "peftkit_random_batches": args.peftkit_random_batches, "precision": resolved_precision(args.precision),
        "load_average": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
