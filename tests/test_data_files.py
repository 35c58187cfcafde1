"""Data path: reading files, fields, labels, held-out split, tokenisation cache, batching, masks."""

from __future__ import annotations

import json

import pytest
import torch
from support import VOCAB, chat_rows, sentiment_rows, write_csv, write_jsonl

from peftkit.train import cache, files
from peftkit.train.batches import collate, epoch_batches, micro_batches, pool_batches
from peftkit.train.config import TrainConfig
from peftkit.train.data import IGNORE, Source, label_ids, load_source, prepare
from peftkit.train.files import DataError
from peftkit.train.models import tokenizer


def test_formats_read_the_same_records(tmp_path) -> None:
    rows = sentiment_rows(6)
    csv_rows = files.read_records(write_csv(tmp_path / "a.csv", rows))
    jsonl_rows = files.read_records(write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert [r["text"] for r in csv_rows] == [r["text"] for r in jsonl_rows] == [r["text"] for r in rows]
    assert files.read_records(tmp_path / "a.json") == rows
    (tmp_path / "a.txt").write_text("\ufeffsome text\n")
    assert files.read_records(tmp_path / "a.txt") == [{"text": "some text\n"}]


def test_parquet(tmp_path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional; without it a clear error is tested below")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(sentiment_rows(4)), tmp_path / "a.parquet")
    assert files.read_records(tmp_path / "a.parquet") == sentiment_rows(4)


def test_parquet_without_pyarrow_says_how(tmp_path, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match="pip install pyarrow"):
        files.read_records(tmp_path / "a.parquet")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"text,label\n", "has no rows"),
    (b"text,label\ncaf\xe9 good,1\n", "not UTF-8.*0xe9.*line 2"),
    (b"text,label\nfine,1,extra\n", "more values than"),
])
def test_bad_csv_files(tmp_path, content, match) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        files.read_records(path)


def test_bad_jsonl_line_is_named(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        files.read_records(path)


def test_unknown_suffix(tmp_path) -> None:
    (tmp_path / "data.xlsx").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell the format"):
        files.read_records(tmp_path / "data.xlsx")


def test_missing_column_lists_columns(tmp_path) -> None:
    src = load_source(str(write_csv(tmp_path / "a.csv", sentiment_rows(4))), {"label": "lable"})
    with pytest.raises(DataError, match="no column 'lable'.*Did you mean: label.*Columns: text, label"):
        files.pick_field(src.records, src.name, "label", "lable", ())


def test_unknown_dataset_name_suggests() -> None:
    from peftkit.train.assets import AssetError

    with pytest.raises(AssetError, match="Did you mean: rotten-tomatoes"):
        load_source("rotten-tomatos", {})


@pytest.mark.parametrize("values, match", [
    ([0, 1, 0.5], "0.5 is not an integer or a category"),
    (["0", "1", "1.5"], "'1.5' is not an integer or a category"),
    ([0, None], "empty label"),
    ([0, [1]], "not an integer or a category"),
    ([0, -1], "negative"),
    ([0, "pos"], "mix numbers and names"),
])
def test_bad_labels(values, match) -> None:
    with pytest.raises(DataError, match=match):
        label_ids(values, "data.csv")


def test_labels_ints_and_categories() -> None:
    assert label_ids(["1", "0", "2"], "x") == ([1, 0, 2], None)
    assert label_ids(["neg", "pos", "neg"], "x") == ([0, 1, 0], ["neg", "pos"])
    with pytest.raises(DataError, match="'meh' does not occur in the training data"):
        label_ids(["meh"], "eval.csv", ["neg", "pos"])


def test_held_out_split_is_fixed_by_content() -> None:
    from peftkit.train.data import _split_rows

    rows = sentiment_rows(60)

    def held(rows_):
        _, test, _ = _split_rows(Source("x", None, rows_, {}, None), 0.25)
        return {(rows_[i]["text"], rows_[i]["label"]) for i in test}

    base = held(rows)
    assert 0 < len(base) < 60
    assert held(list(reversed(rows))) == base  # order does not matter
    assert held(rows + sentiment_rows(20, seed=5)) >= base  # appending rows does not move old ones


def test_tokenisation_is_cached(tmp_path, bert_dir, monkeypatch) -> None:
    tok = tokenizer(str(bert_dir))
    calls = []
    real = cache._tokenize
    monkeypatch.setattr(cache, "_tokenize", lambda *a: calls.append(1) or real(*a))
    texts = ["good movie", "bad film"]
    first = cache.tokenize_cached(tok, texts, add_special_tokens=True, max_length=16)
    second = cache.tokenize_cached(tok, texts, add_special_tokens=True, max_length=16)
    assert first == second and len(calls) == 1
    # a damaged cache entry is recomputed
    entries = list((cache.assets.cache_dir() / "tokens").glob("*.safetensors"))
    for e in entries:
        e.write_bytes(b"garbage")
    assert cache.tokenize_cached(tok, texts, add_special_tokens=True, max_length=16) == first
    assert len(calls) == 2


def test_epoch_batches_deterministic_and_complete() -> None:
    lengths = torch.randint(1, 50, (103,), generator=torch.Generator().manual_seed(0))
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    grouped_pad = sum(len(b) * max(lengths[b].tolist()) for b in a)
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    plain_pad = sum(len(b) * max(lengths[b].tolist()) for b in plain)
    assert grouped_pad < plain_pad
    whole = epoch_batches(lengths, 8, seed=1, epoch=0, pool=pool_batches(per_token=True))  # one pool here
    assert sum(len(b) * max(lengths[b].tolist()) for b in whole) <= grouped_pad
    assert [len(p) for p in micro_batches(list(range(7)), 3)] == [3, 2, 2]
    assert all(len(b) >= 4 for b in epoch_batches(lengths, 8, seed=1, epoch=0, min_size=4))


def test_instruction_loss_only_on_response(llama_dir) -> None:
    tok = tokenizer(str(llama_dir))
    cfg = TrainConfig(task="instruction", eval_fraction=0.2).resolved()
    prep = prepare(cfg, tok, "instruction", Source("chat", None, chat_rows(12), {}, None))
    enc = prep.train
    batch = collate(enc, [0, 1], tok.pad_token_id)
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        seen = labels[mask.bool()]
        first = int((seen != IGNORE).nonzero()[0])
        assert (seen[:first] == IGNORE).all() and (seen[first:] != IGNORE).all()
        answer = tok.decode(ids[mask.bool()][first:])
        prompt = tok.decode(ids[mask.bool()][:first])
        assert "assistant" in prompt and answer.strip().endswith("</s>")
        assert (labels[~mask.bool()] == IGNORE).all()
    assert enc.units.tolist() == [int((enc.labels[enc.offsets[i]:enc.offsets[i + 1]] != IGNORE).sum())
                                  for i in range(len(enc))]


def test_lm_blocks_and_split(llama_dir, tmp_path) -> None:
    tok = tokenizer(str(llama_dir))
    text = " ".join(["the movie was very good ."] * 200)[: -len(" .")]  # 1199 words + eos = 75 blocks
    (tmp_path / "book.txt").write_text(text)
    cfg = TrainConfig(task="lm", max_length=16, eval_fraction=0.2).resolved()
    prep = prepare(cfg, tok, "lm", load_source(str(tmp_path / "book.txt"), {}))
    assert prep.eval is not None and len(prep.eval) > 0
    assert int(prep.train.lengths.max()) == 16
    assert len(prep.train) + len(prep.eval) == (len(text.split()) + 1) // 16  # a 1-token tail is dropped
    assert VOCAB["</s>"] in prep.train.ids.tolist() + prep.eval.ids.tolist()
