"""Forgetting: how much of the base model's original ability is lost with the adapter active, on
data that is not the task's. Measured on the base model once and after every run, the same way for
every method and for ``full``; reported as the loss of ability (positive: worse than the base).

- ``retrieval`` (a classifier: a sentence encoder such as MiniLM, whose original job is semantic
  similarity) — question → answer retrieval over prompt/response pairs (default: chatterbot): each
  text is embedded as the mean of the last hidden states over its tokens, and recall@1 is the share
  of questions whose most cosine-similar answer, among all the pairs' answers, is their own. Pairs
  are unique in both question and answer; a fixed seeded sample of them is used.
- ``perplexity`` (a language model, tasks instruction and lm) — perplexity of held-out general text
  (default: hamlet, never trained on) cut into blocks of 128 tokens; a fixed seeded sample of blocks.

A classifier's hidden states are read through the tuned model's own forward, so adapters that
prepend virtual tokens are measured with them active (their positions are cut from the outputs).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from ..errors import ConfigError
from ..train import data as data_mod
from ..train.data import Encoded
from ..train.trainer import evaluate

DEFAULT_DATA = {"retrieval": "chatterbot", "perplexity": "hamlet"}
SAMPLE_SEED = "peftkit-bench-forgetting-v1"
BLOCK = 128  # tokens per perplexity block
MAX_TEXT = 128  # tokens of a retrieval text
BATCH = 32


def kind_for(task: str) -> str:
    return "retrieval" if task == "classification" else "perplexity"


@dataclasses.dataclass
class Probe:
    """The tokenised data one forgetting measure runs on."""

    kind: str
    data: str
    questions: list[list[int]] = dataclasses.field(default_factory=list)
    answers: list[list[int]] = dataclasses.field(default_factory=list)
    blocks: Encoded | None = None

    @property
    def size(self) -> int:
        return len(self.questions) if self.kind == "retrieval" else len(self.blocks or [])

    def describe(self) -> str:
        if self.kind == "retrieval":
            return (f"question->answer recall@1 over {self.size} {self.data} pairs (cosine of mean-pooled last "
                    "hidden states); forgetting = base - after, in points of recall")
        return f"perplexity of {self.size} blocks of {BLOCK} tokens of {self.data}; forgetting = after - base"


def _sample(n: int, limit: int) -> list[int]:
    return sorted(random.Random(SAMPLE_SEED).sample(range(n), limit)) if n > limit else list(range(n))


def build_probe(kind: str, tokenizer: Any, data: str | None, examples: int) -> Probe:
    """The probe for `kind` on `data` (None: the default), at most `examples` pairs or blocks.

    Raises:
        DataError / AssetError: the data cannot be read or has no usable pairs / text.
    """
    data = data or DEFAULT_DATA[kind]
    src = data_mod.load_source(data, {})
    if kind == "retrieval":
        data_mod.fill_fields(src, "instruction")
        pf, rf = src.fields["prompt"], src.fields["response"]
        pairs: dict[str, str] = {}
        answers_seen: set[str] = set()
        for record in src.records:
            q, a = str(record.get(pf) or "").strip(), str(record.get(rf) or "").strip()
            if q and a and q not in pairs and a not in answers_seen:
                pairs[q] = a
                answers_seen.add(a)
        if len(pairs) < 2:
            raise ConfigError(f"--forgetting-data {data} has fewer than 2 distinct question/answer pairs; retrieval "
                              "needs pairs to tell apart: pass a prompt/response file.")
        chosen = [list(pairs.items())[i] for i in _sample(len(pairs), examples)]
        enc = tokenizer([q for q, _ in chosen] + [a for _, a in chosen], add_special_tokens=True, truncation=True,
                        max_length=MAX_TEXT)["input_ids"]
        return Probe(kind, data, questions=enc[:len(chosen)], answers=enc[len(chosen):])
    data_mod.fill_fields(src, "lm")
    field = src.fields["text"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for r in src.records for t in tokenizer(str(r.get(field) or ""), add_special_tokens=False)["input_ids"]
              + eos]
    blocks = [stream[i:i + BLOCK] for i in range(0, len(stream) - 1, BLOCK) if len(stream[i:i + BLOCK]) > 1]
    if not blocks:
        raise ConfigError(f"--forgetting-data {data} holds no text to measure perplexity on; pass a text file.")
    blocks = [blocks[i] for i in _sample(len(blocks), examples)]
    return Probe(kind, data, blocks=Encoded.from_lists(blocks, blocks, per_token=True))


@torch.inference_mode()
def _embed(model: Any, texts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Unit-length mean-pooled last hidden states of `texts`, in their order (batched by length: little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        width = max(len(texts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, :len(texts[i])] = torch.tensor(texts[i])
            mask[row, :len(texts[i])] = 1
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).float()  # (B, H)
        if not out.numel():
            out = torch.empty(len(texts), pooled.shape[-1])
        out[rows] = pooled
    return out


def measure(model: Any, probe: Probe, pad_id: int) -> float:
    """The ability `probe` measures, of `model` as it is (eval mode): recall@1, or perplexity."""
    was_training = model.training
    model.eval()
    try:
        if probe.kind == "retrieval":
            q, a = _embed(model, probe.questions, pad_id), _embed(model, probe.answers, pad_id)
            hits = (q @ a.T).argmax(1) == torch.arange(len(q))
            return float(hits.float().mean())
        return float(evaluate(model, probe.blocks, "lm", num_labels=None, pad_id=pad_id, batch_size=8)["perplexity"])
    finally:
        model.train(was_training)


def lost(kind: str, base: float, after: float) -> float:
    """The ability lost, positive when `after` is worse than `base`."""
    return base - after if kind == "retrieval" else after - base
