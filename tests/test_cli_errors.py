"""Bad input to `peftkit train` / `eval`: one line on stderr, exit status 1, no traceback, and an
existing run folder left exactly as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from support import sentiment_rows, write_csv

from peftkit import cli


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, bert_dir, sentiment_csv) -> Path:
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "done"
    rc = cli.main(["train", "--model", str(bert_dir), "--data", str(sentiment_csv), "--out", str(out),
                   "--max-steps", "2", "--batch-size", "8", "--no-progress"])
    assert rc == 0
    return out


def _files(tmp: Path) -> dict[str, Path]:
    made = {}
    made["empty"] = tmp / "empty.csv"
    made["empty"].write_bytes(b"")
    made["latin1"] = tmp / "latin1.csv"
    made["latin1"].write_bytes("text,label\nun film tr\xe8s bon,1\n".encode("latin-1"))
    made["float_label"] = write_csv(tmp / "float.csv", [{"text": "good", "label": "0.5"}, {"text": "bad", "label": "1"}])
    made["nested_label"] = tmp / "nested.jsonl"
    made["nested_label"].write_text('{"text": "good", "label": [1]}\n{"text": "bad", "label": 0}\n')
    made["typo_yaml"] = tmp / "typo.yaml"
    made["typo_yaml"].write_text("learning_rate: 0.1\n")
    made["typo_yaml2"] = tmp / "typo2.yaml"
    made["typo_yaml2"].write_text("batch_sise: 4\n")
    made["no_config_dir"] = tmp / "not-a-model"
    made["no_config_dir"].mkdir()
    made["cats"] = write_csv(tmp / "cats.csv", [{"text": r["text"], "label": "pos" if r["label"] else "neg"}
                                               for r in sentiment_rows(16)])
    made["cats_eval"] = write_csv(tmp / "cats_eval.csv", [{"text": "good", "label": "meh"}])
    return made


CASES = [
    ("missing file", ["--data", "{tmp}/nope.csv"], "does not exist"),
    ("empty file", ["--data", "{empty}"], "is empty"),
    ("missing column", ["--label-field", "lable"], "no column 'lable'.*Columns: text, label"),
    ("non-UTF-8", ["--data", "{latin1}"], "not UTF-8"),
    ("non-integer label", ["--data", "{float_label}"], "'0.5' is not an integer or a category"),
    ("nested label", ["--data", "{nested_label}"], "not an integer or a category"),
    ("unseen category in eval data", ["--data", "{cats}", "--eval-data", "{cats_eval}"], "'meh' does not occur"),
    ("unknown model name", ["--model", "minilmm"], "unknown embedded model 'minilmm'.*Did you mean: minilm"),
    ("model folder without config", ["--model", "{no_config_dir}"], "not a Hugging Face model folder"),
    ("unknown dataset name", ["--data", "rotten-tomatoe"], "unknown embedded dataset.*Did you mean: rotten-tomatoes"),
    ("yaml alias typo", ["--config", "{typo_yaml}"], "unknown key 'learning_rate'.*Did you mean: lr"),
    ("yaml spelling typo", ["--config", "{typo_yaml2}"], "unknown key 'batch_sise'.*Did you mean: batch_size"),
    ("unknown method", ["--method", "lorra"], "unknown method 'lorra'.*Did you mean: lora"),
    ("bad method option", ["--method-options", "r=0"], "r must be a positive integer"),
    ("unknown method option", ["--method-options", "rank=4"], "unknown option.*'rank'"),
    ("bad target", ["--method-options", "targets=[qurey]"], "qurey"),
    ("lm task on an encoder", ["--task", "lm"], "needs a causal language model"),
    ("bad config value", ["--batch-size", "0"], "batch_size must be a positive integer"),
    ("resume without checkpoint", ["--resume", "{tmp}/nowhere"], "no checkpoint"),
]


@pytest.mark.parametrize("name, flags, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(name, flags, match, tmp_path, capsys, bert_dir, sentiment_csv, finished_run) -> None:
    import re

    files = {k: str(v) for k, v in _files(tmp_path).items()}
    argv = ["train", "--model", str(bert_dir), "--data", str(sentiment_csv), "--out", str(finished_run),
            "--max-steps", "2", "--no-progress"]
    argv += [f.format(tmp=tmp_path, **files) for f in flags]
    before = _snapshot(finished_run)
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert err.startswith("peftkit: error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(match, err), err
    assert _snapshot(finished_run) == before


def test_eval_of_missing_adapter(capsys, tmp_path) -> None:
    rc = cli.main(["eval", "--adapter", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "does not exist" in err and "\n" not in err


def test_info_of_a_damaged_adapter(capsys, tmp_path, finished_run) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(finished_run / "adapter", broken)
    (broken / "adapter.json").write_text("{not json")
    rc = cli.main(["info", str(broken)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "damaged" in err and "\n" not in err


def test_bad_flag_is_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--batch-size", "many"])
    assert stop.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
