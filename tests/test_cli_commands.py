"""The commands end to end on tiny models: train → info / eval / merge, train → generate, methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import cli


def _json_tail(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, bert_dir, sentiment_csv) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["train", "--model", str(bert_dir), "--data", str(sentiment_csv), "--out", str(out),
                       "--max-steps", "20", "--batch-size", "8", "--lr", "0.02", "--no-progress", "--json",
                       "--method-options", "targets=all-linear,r=4"])
    assert rc == 0
    lines = buf.getvalue().strip().splitlines()
    assert any(line.startswith("  before:") for line in lines) and any("adapter:" in line for line in lines)
    return out, json.loads(lines[-1])


def test_train_json_contract(bert_run) -> None:
    out, result = bert_run
    for key in ("metrics", "trainable_params", "adapter_path", "adapter_bytes", "train_seconds"):
        assert key in result
    assert set(result["metrics"]) >= {"accuracy", "macro_f1", "loss"}
    assert Path(result["adapter_path"]) == out / "adapter"
    assert result["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())


def test_info(bert_run, capsys) -> None:
    out, result = bert_run
    assert cli.main(["info", str(out / "adapter"), "--json"]) == 0
    info = _json_tail(capsys)
    assert info["method"] == "lora" and info["format"] == "peftkit"
    assert info["parameters"] == result["trainable_params"]
    assert info["base"]["architecture"] == "BertForSequenceClassification" and info["base"]["weights_sha256"]
    assert any(s.endswith("query") for s in info["sites"])


def test_eval_reproduces_training_metrics(bert_run, capsys) -> None:
    out, result = bert_run
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--json"]) == 0
    metrics = _json_tail(capsys)["metrics"]
    assert metrics["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert metrics["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)


def test_merge_writes_a_plain_hf_folder(bert_run, bert_dir, tmp_path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    import peftkit

    out, _ = bert_run
    target = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(target), "--json"]) == 0
    assert _json_tail(capsys)["merged_path"] == str(target)
    merged = AutoModelForSequenceClassification.from_pretrained(target).eval()
    tuned = peftkit.load(AutoModelForSequenceClassification.from_pretrained(bert_dir), out / "adapter").eval()
    ids = torch.randint(7, 38, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert cli.main(["merge", "--adapter", str(out / "adapter"), "--out", str(target)]) == 1  # not over a model


def test_generate_with_trained_chat_adapter(tmp_path, llama_dir, chat_jsonl, capsys) -> None:
    out = tmp_path / "chat"
    assert cli.main(["train", "--model", str(llama_dir), "--data", str(chat_jsonl), "--task", "instruction",
                     "--out", str(out), "--max-steps", "40", "--batch-size", "8", "--lr", "0.02", "--no-progress",
                     "--method-options", "targets=all-linear"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(out / "adapter"), "--prompt", "hello", "--prompt", "how are you ?",
                     "--max-new-tokens", "6", "--json"]) == 0
    gens = _json_tail(capsys)["generations"]
    assert [g["response"] for g in gens] == ["hi !", "fine thanks ."]


def test_methods_lists_registered(capsys) -> None:
    import peftkit

    assert cli.main(["methods", "--json"]) == 0
    rows = _json_tail(capsys)["methods"]
    assert {r["name"] for r in rows} == set(peftkit.methods())
    assert all(r["family"] and r["summary"] for r in rows)
    dropout = {r["name"]: r["recommended_base_dropout"] for r in rows}
    assert dropout["prompt_tuning"] == 0.0 and dropout["lora"] is None
    assert cli.main(["methods"]) == 0
    assert "Base dropout 0." in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("p_tuning"))


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "info", "methods", "bench"])
def test_every_command_has_help_with_example(command, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and f"peftkit {command}" in text and "--json" in text
