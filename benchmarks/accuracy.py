"""Every method on the real all-MiniLM-L6-v2 + Rotten Tomatoes, against a frozen-backbone, head-only
baseline: held-out accuracy and trainable share, through ``peftkit train`` (the user's path).

    nice .venv/bin/python benchmarks/accuracy.py head-only                 # the baseline
    nice .venv/bin/python benchmarks/accuracy.py run adapter ia3 ...       # cases below (default: all)
    .venv/bin/python benchmarks/accuracy.py summarize                      # the table so far

``run`` calls ``peftkit train --method M --method-options O`` with the job's defaults (one epoch of
the fixed split, batch 32, each method's recommended settings from ``peftkit methods``, linear
schedule, ``--seed``, 0 unless given; one ``--out`` per seed) in a fresh process per case and appends
its JSON line to <out>/results.jsonl, so cases can be split over processes and summarised later.
Data-scored masks (SNIP) calibrate on the first 4 training batches, as ``peftkit train`` does.

``head-only``: the backbone frozen, features of the train and test split computed once (mean-pooled
last layer, [CLS], and BERT's pooler), a logistic-regression head fitted by L-BFGS for three weight
decays. Two figures: the best head on the pooler output (what BertForSequenceClassification's own head
sees, trained to convergence) and the best of all nine, the bar the table compares against (it favours
the baseline, not peftkit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from _common import minilm_path

from peftkit.train.probe import fit_logistic

DENSE = {"bottleneck": 64}
CASES: dict[str, tuple[str, dict]] = {
    "lora (all linear)": ("lora", {"targets": "all-linear"}),
    "lora r=8 q,v": ("lora", {"r": 8, "alpha": 16, "targets": ["query", "value"]}),
    "adapter (houlsby m=64)": ("adapter", {}),
    "adapter pfeiffer": ("adapter", {"placement": "pfeiffer"}),
    "parallel_adapter": ("parallel_adapter", {}),
    "ia3": ("ia3", {}),
    "prompt_tuning": ("prompt_tuning", {}),
    "p_tuning": ("p_tuning", {}),
    "prefix_tuning": ("prefix_tuning", {}),
    "bitfit": ("bitfit", {}),
    "ln_tuning": ("ln_tuning", {}),
    "layer_tuning": ("layer_tuning", {}),
    "mam": ("mam", {}),
    "unipelt": ("unipelt", {}),
    "sparse_adapter m=64 40%": ("sparse_adapter", {"base_options": DENSE, "sparsity": 0.4}),
    "sparse_adapter m=64 80%": ("sparse_adapter", {"base_options": DENSE, "sparsity": 0.8}),
    "large-sparse m=320 80%": ("sparse_adapter", {"base_options": {"bottleneck": 320}, "sparsity": 0.8}),
}


def options_text(options: dict) -> str:
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.cases or list(CASES):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; cases: {', '.join(CASES)}")
        method, options = CASES[name]
        folder = out / name.replace(" ", "_").replace("/", "-")
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resumed one
        cmd = [sys.executable, "-m", "peftkit", "train", "--method", method, "--threads", str(args.threads),
               "--seed", str(args.seed), "--no-progress", "--no-eval-before", "--json",
               "--out", str(folder)]
        if options:
            cmd += ["--method-options", options_text(options)]
        if args.head_lr is not None:
            cmd += ["--head-lr", str(args.head_lr)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps({"case": name, "command": " ".join(cmd[1:]), **result}) + "\n")
        print(f"{name}: accuracy {result['metrics']['accuracy']:.4f}, trainable {result['trainable_params']:,} "
              f"({result['train_seconds']:.0f} s)", flush=True)


@torch.no_grad()
def features(texts: list[str], tok, encoder, batch_size: int = 64) -> dict[str, torch.Tensor]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = {k: torch.empty(len(texts), encoder.config.hidden_size) for k in ("mean", "cls", "pooler")}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = encoder(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out["mean"][idx] = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
        out["cls"][idx] = hidden.last_hidden_state[:, 0]
        out["pooler"][idx] = hidden.pooler_output
    return out


def fit_head(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             weight_decay: float) -> float:
    """Test accuracy of a logistic-regression head (the fit `peftkit train` uses to start soft prompts' heads)."""
    weight, bias = fit_logistic(x_train, y_train, 2, weight_decay)
    return ((x_test @ weight.T + bias).argmax(1) == y_test).float().mean().item()


def head_only(args: argparse.Namespace) -> None:
    from transformers import AutoModel, AutoTokenizer

    from peftkit.train import assets

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = assets.rotten_tomatoes()
    train = [r for r, held in zip(data.records, data.split, strict=True) if not held]
    test = [r for r, held in zip(data.records, data.split, strict=True) if held]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    encoder = AutoModel.from_pretrained(minilm_path()).eval()
    f_train, f_test = (features([r["text"] for r in rows], tok, encoder) for rows in (train, test))
    y_train, y_test = (torch.tensor([r["label"] for r in rows]) for rows in (train, test))
    results = {}
    for pooling in f_train:
        for wd in (1e-4, 1e-3, 1e-2):
            results[f"{pooling} wd={wd:g}"] = acc = fit_head(f_train[pooling], y_train, f_test[pooling], y_test, wd)
            print(f"head-only [{pooling}] weight decay {wd:g}: test accuracy {acc:.4f}")
    own = max(v for k, v in results.items() if k.startswith("pooler"))
    best = max(results.values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_only.json").write_text(json.dumps({"pooler": own, "best": best, "all": results,
                                                    "train": len(train), "test": len(test)}))
    print(f"baseline: {own:.4f} with the classification model's own head input (BERT pooler), {best:.4f} with "
          f"the best of all nine; {len(train)} train / {len(test)} test")


def summarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    base_file = out / "head_only.json"
    baselines = json.loads(base_file.read_text()) if base_file.exists() else None
    base = baselines["best"] if baselines else None
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    latest = {r["case"]: r for r in rows}
    print(f"all-MiniLM-L6-v2 + Rotten Tomatoes ({rows[0]['steps']} steps of 32, held-out {rows[0]['metrics']['examples']})"
          + (f"; head-only baseline {baselines['pooler']:.4f} (converged head on the model's pooler output), "
             f"{base:.4f} (best pooling, the bar used below)" if baselines else ""))
    print(f"{'case':26}{'trainable':>11}{'% of base':>10}{'accuracy':>10}{'macro-F1':>10}"
          + (f"{'vs head-only':>14}" if base is not None else ""))
    for name in [n for n in CASES if n in latest]:
        r = latest[name]
        share = 100 * r["trainable_params"] / r["total_params"]
        acc = r["metrics"]["accuracy"]
        print(f"{name:26}{r['trainable_params']:>11,}{share:>10.3f}{acc:>10.4f}{r['metrics']['macro_f1']:>10.4f}"
              + (f"{acc - base:>+14.4f}" if base is not None else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "head-only", "summarize"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="/tmp/peftkit-accuracy")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
    sub.choices["run"].add_argument("cases", nargs="*", help=f"case names (default: all): {', '.join(CASES)}")
    sub.choices["run"].add_argument("--head-lr", type=float, help="passed to peftkit train (default: its own)")
    args = parser.parse_args()
    {"run": run, "head-only": head_only, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()
