"""The no-training baselines of a causal LM: the base model prompted (the survey's "prompt
engineering" route), scored on the same held-out examples with the same metric as trained runs.

- ``zero-shot`` — each held-out example alone. Instruction / lm data: the held-out loss of the
  reference response given the prompt (for instruction data exactly the trained runs' evaluation, on
  the untouched base). Classification: the text in a written template, ``Classify the text as one of:
  <label names>.`` then ``Text: <text>``, as the user turn of the model's chat template (a plain
  ``### Prompt / ### Response`` layout without one); the prediction is the label whose name, as the
  answer, has the highest log-likelihood (summed over its tokens). Accuracy and macro-F1 as trained.
- ``few-shot`` — the same, after ``k`` training examples shown as earlier turns of the conversation
  (classification: drawn round-robin over the classes, so none is favoured; the draw follows the seed).
  The context may be longer than training's ``max_length``: up to `CONTEXT` tokens (or the model's
  limit), the earliest tokens cut first.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..train import data as data_mod
from ..train.batches import answer_logits_only, collate, takes_logits_to_keep
from ..train.data import FALLBACK_TEMPLATE, IGNORE, Encoded
from ..train.metrics import classification_metrics
from ..train.trainer import evaluate

CLASSIFY = "Classify the text as one of: {choices}.\n\nText: {text}"
CONTEXT = 1024  # tokens a few-shot example may use
BATCH = 8


def format_turns(tokenizer: Any, history: list[tuple[str, str]], prompt: str, response: str) -> tuple[str, str]:
    """(the text before the answer, the answer with its end-of-turn marker) for `prompt` after the
    (prompt, response) turns of `history`, in the model's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        turns = [m for p, r in history for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]
        turns.append({"role": "user", "content": prompt})
        head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
    eos = tokenizer.eos_token or ""
    head = "".join(FALLBACK_TEMPLATE.format(prompt=p) + r + eos + "\n\n" for p, r in history)
    return head + FALLBACK_TEMPLATE.format(prompt=prompt), response + eos


def encode(tokenizer: Any, head: str, tail: str, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels: -100 on the head) as the trainer encodes instruction data, cut to
    `max_length` from the left (the answer keeps at least half)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    h = tokenizer(head, add_special_tokens=not chat)["input_ids"]
    t = tokenizer(tail, add_special_tokens=False)["input_ids"]
    t = t[: max(max_length // 2, max_length - len(h))]
    h = h[-(max_length - len(t)):]
    return h + t, [IGNORE] * len(h) + t


def demo_rows(train_rows: list[int], labels: list[int] | None, k: int, seed: int) -> list[int]:
    """`k` training rows to show in context: a seeded draw, round-robin over the classes when `labels`."""
    rng = random.Random(f"peftkit-bench-few-shot-{seed}")
    if labels is None:
        return rng.sample(train_rows, min(k, len(train_rows)))
    by_class: dict[int, list[int]] = {}
    for row, y in zip(train_rows, labels, strict=True):
        by_class.setdefault(y, []).append(row)
    pools = [rng.sample(rows, len(rows)) for _, rows in sorted(by_class.items())]
    picked = [pool[i] for i in range(max(len(p) for p in pools)) for pool in pools if i < len(pool)][:k]
    rng.shuffle(picked)
    return picked


@torch.inference_mode()
def answer_logprobs(model: Any, enc: Encoded, pad_id: int) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens given the tokens before them."""
    out = torch.zeros(len(enc), dtype=torch.float64)
    trim = takes_logits_to_keep(getattr(model, "model", model))
    for start in range(0, len(enc), BATCH):
        index = list(range(start, min(start + BATCH, len(enc))))
        batch = collate(enc, index, pad_id)
        if trim:
            batch = answer_logits_only(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != IGNORE
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out[start:start + len(index)] = (picked * mask).sum(1).double()
    return out


def score(model: Any, tokenizer: Any, cfg: Any, task: str, src: data_mod.Source, eval_src: data_mod.Source | None,
          prepared: data_mod.Prepared, k: int, seed: int, context: int) -> dict[str, float]:
    """Held-out metrics of the base `model` prompted with `k` examples in context (0: zero-shot).
    `cfg` is the resolved TrainConfig of the bench's runs, `prepared` their data."""
    pad_id = tokenizer.pad_token_id
    if task in ("instruction", "lm") and k == 0:
        return evaluate(model, prepared.eval, task, num_labels=None, pad_id=pad_id, batch_size=cfg.eval_batch_size)
    train_rows, held_src, eval_rows = data_mod.example_rows(cfg, task, src, eval_src)
    if task == "instruction":
        pf, rf = src.fields["prompt"], src.fields["response"]
        shown = [(str(src.records[r][pf]), str(src.records[r][rf])) for r in demo_rows(train_rows, None, k, seed)]
        seqs, labels = zip(*(encode(tokenizer, *format_turns(tokenizer, shown, str(held_src.records[r][pf]),
                                                             str(held_src.records[r][rf])), context)
                             for r in eval_rows), strict=True)
        enc = Encoded.from_lists(list(seqs), list(labels), per_token=True)
        return evaluate(model, enc, task, num_labels=None, pad_id=pad_id, batch_size=BATCH)
    return _classify(model, tokenizer, src, held_src, train_rows, eval_rows, prepared, k, seed, context)


def _classify(model: Any, tokenizer: Any, src: data_mod.Source, held_src: data_mod.Source, train_rows: list[int],
              eval_rows: list[int], prepared: data_mod.Prepared, k: int, seed: int, context: int) -> dict[str, float]:
    tf, lf = src.fields["text"], src.fields["label"]
    names = [str(n) for n in (prepared.label_names or range(prepared.num_labels or 2))]
    known = prepared.label_names
    train_y = data_mod.label_ids([src.records[r][lf] for r in train_rows], src.name, known)[0]
    gold = data_mod.label_ids([held_src.records[r][lf] for r in eval_rows], held_src.name, known)[0]
    label_of = dict(zip(train_rows, train_y, strict=True))
    choices = ", ".join(names)
    shown = [(CLASSIFY.format(choices=choices, text=src.records[r][tf]), names[label_of[r]])
             for r in demo_rows(train_rows, train_y, k, seed)] if k else []
    seqs, labels = [], []
    for r in eval_rows:
        prompt = CLASSIFY.format(choices=choices, text=held_src.records[r][tf])
        for name in names:
            ids, lab = encode(tokenizer, *format_turns(tokenizer, shown, prompt, name), context)
            seqs.append(ids)
            labels.append(lab)
    logp = answer_logprobs(model, Encoded.from_lists(seqs, labels, per_token=True), tokenizer.pad_token_id)
    predicted = logp.view(len(eval_rows), len(names)).argmax(1)
    confusion = torch.zeros(len(names), len(names), dtype=torch.float64)
    confusion.index_put_((torch.tensor(gold), predicted), torch.ones(len(gold), dtype=torch.float64), accumulate=True)
    return classification_metrics(confusion)
