"""A trained classification adapter onto a freshly loaded base, N times: through Python (the README's
flow, `from_pretrained(path, num_labels=2)` then `peftkit.load`) and through the command line
(`peftkit eval --adapter ...`), each load under another seed, so the new task head differs each time.

    .venv/bin/python benchmarks/fresh_base_loads.py [--times 20] [--steps 20]

Trains all-MiniLM-L6-v2 + Rotten Tomatoes with LoRA for a few steps first (a real run folder), then
counts loads that succeed with the trained model's predictions, and loads refused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peftkit
    from peftkit.train import TrainConfig, assets, train

    out = tempfile.mkdtemp(prefix="fresh-loads-")
    train(TrainConfig(max_steps=args.steps, max_eval_examples=256, out=out, progress=False), echo=lambda _s: None)
    path = assets.model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés."]
    enc = tok(texts, return_tensors="pt", padding=True)
    python_ok, cli_ok, predictions = 0, 0, set()
    for seed in range(args.times):
        torch.manual_seed(1000 + seed)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a note such as "not bit-identical" counts as a failure
            try:
                tuned = peftkit.load(base, f"{out}/adapter").eval()
            except (peftkit.PeftkitError, UserWarning) as err:
                print(f"python load {seed} refused: {err}", file=sys.stderr)
                continue
        with torch.no_grad():
            predictions.add(tuple(tuned(**enc).logits.argmax(-1).tolist()))
        python_ok += 1
    for seed in range(args.times):
        done = subprocess.run([sys.executable, "-m", "peftkit", "eval", "--adapter", f"{out}/adapter",
                               "--max-eval-examples", "64", "--no-progress", "--json"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)})
        cli_ok += done.returncode == 0 and "accuracy" in json.loads(done.stdout.strip().splitlines()[-1])["metrics"]
    print(json.dumps({"python_loads": f"{python_ok}/{args.times}", "cli_loads": f"{cli_ok}/{args.times}",
                      "distinct_predictions": len(predictions), "run": out}))


if __name__ == "__main__":
    main()
