"""From a dataset name or file to tokenised train / held-out sets, ready for batching.

- Records come from an embedded dataset (`peftkit.assets`) or a file (`files.read_records`).
- The held-out split is fixed: the dataset's own split, ``--eval-data``, or a salted hash of each
  record's content (stable when rows are reordered or appended), recorded in the run metadata.
- Tokenisation runs once per (tokenizer, texts, options) and is cached on disk by content hash.
- Tasks: ``classification`` (text → label), ``instruction`` (prompt → response, loss on the
  response tokens only, through the model's chat template when it has one) and ``lm`` (plain
  text, concatenated and cut into blocks of ``max_length`` tokens).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import assets
from .cache import tokenize_cached
from .config import TrainConfig
from .files import DataError, exists, pick_field, read_records

IGNORE = -100
SPLIT_SALT = "peftkit-split-v1"
TEXT_FIELDS = ("text", "sentence", "content", "review", "document")
LABEL_FIELDS = ("label", "labels", "category", "class", "target")
PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
FALLBACK_TEMPLATE = "### Prompt:\n{prompt}\n\n### Response:\n"
EVAL_SAMPLE_SEED = "peftkit-eval-sample-v1"  # --max-eval-examples draws the same sample in every run
LISTED = 8  # names shown in a message before "... (N in all)"
ROLES = {"classification": ("text", "label"), "instruction": ("prompt", "response"), "lm": ("text",)}
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits: str.isdigit() also takes '²', which int() refuses


@dataclass
class Encoded:
    """Token sequences stored flat: sequence i is ``ids[offsets[i]:offsets[i+1]]``.

    `labels` is per sequence (classification, shape (N,)) or per token (aligned with `ids`, with
    -100 where no loss is taken). `units[i]` is what sequence i adds to the loss average.
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    per_token: bool
    units: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.per_token:
            counted = (self.labels != IGNORE).long()
            counted[self.offsets[:-1]] = 0  # the first token of a sequence is never predicted
            cums = torch.cat([torch.zeros(1, dtype=torch.long), counted.cumsum(0)])
            self.units = cums[self.offsets[1:]] - cums[self.offsets[:-1]]
        else:
            self.units = torch.ones(len(self.offsets) - 1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    @classmethod
    def from_lists(cls, seqs: list[list[int]], labels: list[Any], per_token: bool) -> Encoded:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        flat = torch.tensor([t for s in labels for t in s] if per_token else labels, dtype=torch.long)
        return cls(ids, offsets, flat, per_token)

    def subset(self, index: list[int]) -> Encoded:
        seqs = [self.ids[self.offsets[i]:self.offsets[i + 1]].tolist() for i in index]
        if self.per_token:
            labels = [self.labels[self.offsets[i]:self.offsets[i + 1]].tolist() for i in index]
        else:
            labels = self.labels[index].tolist()
        return Encoded.from_lists(seqs, labels, self.per_token)


@dataclass
class Prepared:
    task: str
    train: Encoded
    eval: Encoded | None
    label_names: list[str] | None = None
    num_labels: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was done to the data that the user should hear of


@dataclass
class Source:
    """Records before tokenisation, with the fields and split that apply."""

    name: str
    task: str | None
    records: list[dict[str, Any]]
    fields: dict[str, str]
    held_out: list[bool] | None
    label_names: list[str] | None = None


def load_source(spec: str, fields: dict[str, str | None]) -> Source:
    if assets.is_dataset_name(spec):
        ds = assets.dataset(spec)
        given = {k: v for k, v in fields.items() if v is not None}
        merged = {**ds.fields, **given}
        for role, name in given.items():
            pick_field(ds.records, f"dataset {spec!r}", role, name, ())
        return Source(spec, ds.task, ds.records, merged, ds.split, ds.label_names)
    path = Path(spec).expanduser()
    if not exists(path) and not path.suffix and "/" not in spec:
        assets.dataset(spec)  # a bare word that is neither a file nor an embedded name: say which names exist
    return Source(spec, None, read_records(path), {k: v for k, v in fields.items() if v is not None}, None)


def _hash_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    digest = hashlib.sha256((salt + "\0" + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _record_key(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)


# -- labels -----------------------------------------------------------------------------------
def listing(names: list[Any], limit: int = LISTED) -> str:
    """``a, b, c`` or ``a, b, ..., h (500 in all)``: a message names a few, never hundreds."""
    shown = ", ".join(map(str, names[:limit]))
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        try:
            return int(value.strip())
        except ValueError:  # more digits than Python converts
            return None
    return None


def _looks_numeric(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    try:
        float(str(value))
        return True
    except ValueError:
        return False


def label_ids(values: list[Any], source: str, names: list[str] | None = None) -> tuple[list[int], list[str] | None]:
    """Integer class ids for label values: integers 0..K-1, or category names (sorted → ids).

    Raises:
        DataError: an empty label, a non-integer number, a nested value, a negative id, or (with
            `names`) a category that the training data does not have.
    """
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{source} record {i + 1} has an empty label; every row needs one.")
        if isinstance(v, list | dict):
            raise DataError(f"{source} record {i + 1}: label {v!r} is not an integer or a category name.")
    ints = [_as_int(v) for v in values]
    if names is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = next((i for i, x in enumerate(ints) if not 0 <= x < len(names)), None)
        if bad is not None:
            raise DataError(f"{source} record {bad + 1}: label {values[bad]!r} is not one of 0..{len(names) - 1}.")
        return ints, names
    if names is None and all(x is not None for x in ints):
        bad = next((i for i, x in enumerate(ints) if x < 0), None)
        if bad is not None:
            raise DataError(f"{source} record {bad + 1}: label {values[bad]!r} is negative; use ids 0..K-1 or names.")
        return ints, None
    numeric = [i for i, v in enumerate(values) if _looks_numeric(v)]
    if names is None and numeric and len(numeric) == len(values):
        bad = next(i for i, x in enumerate(ints) if x is None)
        raise DataError(f"{source} record {bad + 1}: label {values[bad]!r} is not an integer or a category name; "
                        "classification needs class ids 0..K-1 or category names.")
    if names is None and any(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise DataError(f"{source}: labels mix numbers and names (e.g. {values[numeric[0]]!r}); use one kind.")
    text = [str(v).strip() for v in values]
    names = names if names is not None else sorted(set(text))
    index = {n: i for i, n in enumerate(names)}
    unknown = next((t for t in text if t not in index), None)
    if unknown is not None:
        hint = ""
        if len(names) > max(LISTED, len(values) // 2):
            hint = (f" {len(names)} classes for {len(values)} rows look like free text, not classes: is this the "
                    "label column? Name it with --label-field, or train another --task (lm, instruction).")
        raise DataError(f"{source}: label {unknown!r} does not occur in the training data ({listing(names)}).{hint}")
    return [index[t] for t in text], names


# -- formatting ---------------------------------------------------------------------------------
def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a causal LM sees before its answer (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def format_pair(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, response text); the response includes the end-of-turn marker."""
    head = format_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
    return head, response + (tokenizer.eos_token or "")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(record: dict[str, Any], name: str, source: str, index: int) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{source} record {index + 1} has no {name!r} value.")
    return value if isinstance(value, str) else str(value)


# -- encoders -----------------------------------------------------------------------------------
def _encode_classification(tok: Any, src: Source, rows: list[int], cfg: TrainConfig,
                           names: list[str] | None) -> tuple[Encoded, list[str] | None]:
    text_f, label_f = src.fields["text"], src.fields["label"]
    texts = [_text(src.records[i], text_f, src.name, i) for i in rows]
    labels, names = label_ids([src.records[i][label_f] for i in rows], src.name, names)
    ids = tokenize_cached(tok, texts, add_special_tokens=True, max_length=cfg.max_length)
    return Encoded.from_lists(ids, labels, per_token=False), names


def _encode_instruction(tok: Any, src: Source, rows: list[int], cfg: TrainConfig) -> Encoded:
    pf, rf = src.fields["prompt"], src.fields["response"]
    pairs = [format_pair(tok, _text(src.records[i], pf, src.name, i), _text(src.records[i], rf, src.name, i))
             for i in rows]
    chat = bool(getattr(tok, "chat_template", None))
    heads = tokenize_cached(tok, [p for p, _ in pairs], add_special_tokens=not chat, max_length=None)
    tails = tokenize_cached(tok, [r for _, r in pairs], add_special_tokens=False, max_length=None)
    seqs, labels = [], []
    for head, tail in zip(heads, tails, strict=True):
        tail = tail[: max(cfg.max_length // 2, cfg.max_length - len(head))]
        head = head[-(cfg.max_length - len(tail)):]  # keep the end of an over-long prompt
        seqs.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    return Encoded.from_lists(seqs, labels, per_token=True)


def _lm_blocks(tok: Any, src: Source, rows: list[int], cfg: TrainConfig) -> list[list[int]]:
    text_f = src.fields["text"]
    docs = tokenize_cached(tok, [_text(src.records[i], text_f, src.name, i) for i in rows],
                           add_special_tokens=False, max_length=None)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream = [t for d in docs for t in d + eos]
    size = cfg.max_length
    return [stream[i:i + size] for i in range(0, len(stream), size) if len(stream[i:i + size]) > 1]


def _split_rows(src: Source, fraction: float) -> tuple[list[int], list[int], str]:
    if src.held_out is not None:
        held = src.held_out
        how = f"fixed split of dataset {src.name!r}"
    else:
        held = [_hash_fraction(_record_key(r)) < fraction for r in src.records]
        how = f"sha256('{SPLIT_SALT}' + record) < {fraction}"
    train = [i for i, h in enumerate(held) if not h]
    test = [i for i, h in enumerate(held) if h]
    return train, test, how


def _digest(enc: Encoded | None) -> str | None:
    if enc is None:
        return None
    digest = hashlib.sha256(enc.ids.numpy().tobytes())
    digest.update(enc.offsets.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_task(cfg: TrainConfig, src: Source, causal: bool | None) -> str:
    if cfg.task is not None:
        return cfg.task
    if src.task is not None:
        return src.task
    if causal:
        cols = set(src.records[0]) if src.records else set()
        has_pair = any(c in cols for c in PROMPT_FIELDS) and any(c in cols for c in RESPONSE_FIELDS)
        return "instruction" if has_pair or src.fields.get("prompt") else "lm"
    return "classification"


def fill_fields(src: Source, task: str) -> None:
    roles = {"classification": (("text", TEXT_FIELDS), ("label", LABEL_FIELDS)),
             "instruction": (("prompt", PROMPT_FIELDS), ("response", RESPONSE_FIELDS)),
             "lm": (("text", TEXT_FIELDS),)}[task]
    for role, candidates in roles:
        src.fields[role] = pick_field(src.records, src.name, role, src.fields.get(role), candidates)


def _drop_blank(src: Source, task: str, rows: list[int], notes: list[str], what: str) -> list[int]:
    """`rows` without those whose text (prompt, response) is empty, with a note of how many went."""
    roles = [src.fields[r] for r in ROLES[task] if r != "label"]
    kept = [i for i in rows if not any(_blank(src.records[i].get(name)) for name in roles)]
    if len(kept) < len(rows):
        cols = " / ".join(repr(c) for c in roles)
        if not kept:
            raise DataError(f"every {what} row of {src.name} has an empty {cols}; check the column (set "
                            f"--{ROLES[task][0]}-field) or the file.")
        notes.append(f"dropped {len(rows) - len(kept)} of {len(rows)} {what} rows of {src.name} with an empty {cols}")
    return kept


def _check_classes(train: Encoded, names: list[str] | None, src: Source) -> int:
    """The number of classes; a label column with a single class is refused."""
    present = sorted(set(train.labels.tolist()))
    if len(present) < 2:
        only = names[present[0]] if names else present[0]
        raise DataError(f"{src.name}: the label column {src.fields['label']!r} holds one class only ({only!r}) in the "
                        "training rows; classification needs at least two. Name the right column with "
                        "--label-field, or train another --task (lm, instruction).")
    return len(names) if names else max(2, int(train.labels.max()) + 1)


def sample_index(n: int, limit: int | None) -> list[int]:
    """Which of `n` held-out examples ``--max-eval-examples limit`` keeps: the same seeded sample whatever the run."""
    if not limit or n <= limit:
        return list(range(n))
    return sorted(random.Random(EVAL_SAMPLE_SEED).sample(range(n), limit))


def _sample(test: Encoded | None, limit: int | None, meta: dict[str, Any]) -> Encoded | None:
    """At most `limit` held-out examples: the same seeded sample whatever the run."""
    if test is None or not limit or len(test) <= limit:
        return test
    meta["eval_sample"] = f"{limit} of {len(test)} held-out examples (random.Random({EVAL_SAMPLE_SEED!r}))"
    return test.subset(sample_index(len(test), limit))


def example_rows(cfg: TrainConfig, task: str, src: Source,
                 eval_src: Source | None = None) -> tuple[list[int], Source, list[int]]:
    """(training rows of `src`, the held-out source, its rows) exactly as `prepare` uses them for a
    task with one example per record (classification, instruction): blank rows dropped, the held-out
    rows cut to the ``--max-eval-examples`` sample. For building other views of the same examples
    (a prompt around each held-out example, training examples shown in context)."""
    train_rows, eval_src, eval_rows, _, _ = _select_rows(cfg, task, src, eval_src)
    return train_rows, eval_src, [eval_rows[i] for i in sample_index(len(eval_rows), cfg.max_eval_examples)]


def _select_rows(cfg: TrainConfig, task: str, src: Source, eval_src: Source | None
                 ) -> tuple[list[int], Source, list[int], str, list[str]]:
    """(training rows, held-out source, its rows, how the split was made, notes): blank rows dropped."""
    fill_fields(src, task)
    if eval_src is not None:
        fill_fields(eval_src, task)
        train_rows, eval_rows = list(range(len(src.records))), list(range(len(eval_src.records)))
        how = f"held-out file {eval_src.name}"
    else:
        train_rows, eval_rows, how = _split_rows(src, cfg.eval_fraction)
        eval_src = src
    notes: list[str] = []
    train_rows = _drop_blank(src, task, train_rows, notes, "training")
    eval_rows = _drop_blank(eval_src, task, eval_rows, notes, "held-out") if eval_rows else eval_rows
    return train_rows, eval_src, eval_rows, how, notes


def prepare(cfg: TrainConfig, tokenizer: Any, task: str, src: Source, eval_src: Source | None = None) -> Prepared:
    """Tokenised train and held-out sets for `task` (cfg must be `resolved()`). Rows whose text is
    empty are dropped (`Prepared.notes` says how many); `cfg.max_eval_examples` caps the held-out set."""
    train_rows, eval_src, eval_rows, how, notes = _select_rows(cfg, task, src, eval_src)
    names = src.label_names
    if task == "classification":
        train, names = _encode_classification(tokenizer, src, train_rows, cfg, names)
        test = _encode_classification(tokenizer, eval_src, eval_rows, cfg, names)[0] if eval_rows else None
    elif task == "instruction":
        train = _encode_instruction(tokenizer, src, train_rows, cfg)
        test = _encode_instruction(tokenizer, eval_src, eval_rows, cfg) if eval_rows else None
    else:
        train, test, how = _encode_lm(tokenizer, src, eval_src, train_rows, eval_rows, cfg, how)
    if len(train) == 0:
        raise DataError(f"{src.name} leaves no training examples after the held-out split; add data.")
    num_labels = None
    if task == "classification":
        num_labels = _check_classes(train, names, src)
        if test is not None and len(test) and int(test.labels.max()) >= num_labels:
            raise DataError(f"{eval_src.name} has label {int(test.labels.max())}, beyond the training labels "
                            f"0..{num_labels - 1}.")
    if test is None or len(test) == 0:
        notes.append(f"{(eval_src or src).name} leaves no held-out examples ({how}), so the run is not evaluated; "
                     "pass --eval-data FILE for a held-out set")
    meta: dict[str, Any] = {"data": src.name, "task": task, "split": how}
    test = _sample(test, cfg.max_eval_examples, meta)
    meta.update({"train_examples": len(train), "eval_examples": len(test) if test is not None else 0,
                 "eval_digest": _digest(test), "fields": dict(src.fields)})
    return Prepared(task, train, test, names, num_labels, meta, notes)


def _encode_lm(tok: Any, src: Source, eval_src: Source, train_rows: list[int], eval_rows: list[int],
               cfg: TrainConfig, how: str) -> tuple[Encoded, Encoded | None, str]:
    if eval_src is src and src.held_out is None:
        # split by block, so a single long text (a book) still gets a held-out part
        blocks = _lm_blocks(tok, src, sorted(train_rows + eval_rows), cfg)
        held = [_hash_fraction(f"block {i}") < cfg.eval_fraction for i in range(len(blocks))]
        if blocks and not any(held):
            held[-1] = True
        train_blocks = [b for b, h in zip(blocks, held, strict=True) if not h]
        test_blocks = [b for b, h in zip(blocks, held, strict=True) if h]
        how = f"blocks of {cfg.max_length} tokens, sha256('{SPLIT_SALT}' + index) < {cfg.eval_fraction}"
    else:
        train_blocks = _lm_blocks(tok, src, train_rows, cfg)
        test_blocks = _lm_blocks(tok, eval_src, eval_rows, cfg) if eval_rows else []
    train = Encoded.from_lists(train_blocks, train_blocks, per_token=True)
    test = Encoded.from_lists(test_blocks, test_blocks, per_token=True) if test_blocks else None
    return train, test, how
