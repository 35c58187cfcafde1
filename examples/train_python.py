"""The main job from Python: fine-tune, evaluate, reload the adapter.

    .venv/bin/python examples/train_python.py            # MiniLM + Rotten Tomatoes + LoRA, 60 steps

The same run as `peftkit train --max-steps 60 --method-options r=8,targets=[query,value] --out runs/example
--overwrite` (each run of the example replaces the last).
"""

from transformers import AutoModelForSequenceClassification

import peftkit
from peftkit.train import TrainConfig, assets, train

result = train(TrainConfig(model="minilm", data="rotten-tomatoes", method="lora",
                           method_options={"r": 8, "targets": ["query", "value"]},
                           max_steps=60, out="runs/example", overwrite=True))
print("held-out accuracy", result["metrics"]["accuracy"], "adapter", result["adapter_path"])

# later: the adapter on a fresh copy of the base
base = AutoModelForSequenceClassification.from_pretrained(assets.model_path("minilm"), num_labels=2)
tuned = peftkit.load(base, result["adapter_path"])
print(tuned.summary())
