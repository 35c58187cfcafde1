"""Run configuration: option parsing, YAML files, flag precedence, typo suggestions."""

from __future__ import annotations

import pytest
import yaml

from peftkit import cli
from peftkit.errors import ConfigError
from peftkit.train.config import TrainConfig, from_mapping, load_file, parse_options
from peftkit.train.recipes import recipe
from peftkit.train.trainer import lr_factor


def test_parse_options_yaml_values_and_brackets() -> None:
    opts = parse_options("r=16,alpha=32.5,targets=[query,value],dropout=0.1,dora=true,rank_pattern={query: 4, value: 2}")
    assert opts == {"r": 16, "alpha": 32.5, "targets": ["query", "value"], "dropout": 0.1, "dora": True,
                    "rank_pattern": {"query": 4, "value": 2}}
    assert parse_options("targets='re:.*\\.(query|value)'") == {"targets": "re:.*\\.(query|value)"}


def test_parse_options_rejects_non_pairs() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_options("r=8,alpha")


def test_yaml_typo_suggests_the_key(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: minilm\nbatch_szie: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_szie'.*Did you mean: batch_size"):
        load_file(path)


def test_yaml_syntax_error_names_the_line(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: minilm\nepochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML.*line"):
        load_file(path)


def test_yaml_numbers_are_coerced(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nepochs: 2\nmethod_options: r=4,alpha=8\n")
    cfg = load_file(path)
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.epochs, float)
    assert cfg.method_options == {"r": 4, "alpha": 8}


def test_flags_override_file_and_print_config(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "batch_size": 8, "lr": 0.01, "method_options": {"r": 4},
                                    "seed": 3}))
    rc = cli.main(["train", "--config", str(path), "--batch-size", "16", "--method-options", "r=2,alpha=4",
                   "--print-config"])
    assert rc == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["batch_size"] == 16  # flag wins
    assert shown["lr"] == 0.01 and shown["seed"] == 3  # file kept where no flag was given
    assert shown["method_options"] == {"targets": "all-linear", "r": 2, "alpha": 4}  # over LoRA's training options
    assert shown["model"] == "minilm" and shown["data"] == "rotten-tomatoes"  # defaults fill the rest


def test_invalid_values_collected() -> None:
    cfg = from_mapping({"batch_size": 0, "schedule": "step", "epochs": -1}, "test")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    assert "batch_size" in message and "schedule" in message and "epochs" in message


def test_resolved_task_defaults() -> None:
    assert TrainConfig(task="classification").resolved().lr == 1e-3
    assert TrainConfig(task="instruction").resolved().max_length == 256


def test_lr_schedule_shapes() -> None:
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "linear") == pytest.approx(0.01)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_default_method_is_lora_with_its_training_options() -> None:
    assert (TrainConfig().resolved().method, TrainConfig().resolved().method_options) == ("lora", {"targets": "all-linear"})
    assert TrainConfig(method="lora").resolved() == TrainConfig().resolved()
    assert TrainConfig(method_options={"r": 4}).resolved().method_options == {"targets": "all-linear", "r": 4}


def test_method_recommended_learning_rate_is_the_default_and_flags_win():
    assert TrainConfig(method="ia3").resolved().lr == recipe("ia3").lr == 1e-2
    assert TrainConfig(method="ia3", lr=1e-4).resolved().lr == 1e-4
    assert TrainConfig(method="lora").resolved().lr == 1e-3  # no recommendation: the task default
    assert TrainConfig(method="lora", task="instruction").resolved().lr == 2e-3
    assert TrainConfig(method="ia3", task="instruction").resolved().lr == 1e-2  # the method's rate first
    assert TrainConfig().resolved().head_lr is None  # LoRA: the head trains at lr
    assert TrainConfig(method="prefix_tuning").resolved().head_lr == recipe("prefix_tuning").head_lr == 1e-2
    assert TrainConfig(method="prefix_tuning", head_lr=3e-3).resolved().head_lr == 3e-3


def test_evaluation_batch_defaults_by_task():
    assert TrainConfig().resolved().eval_batch_size == 128
    assert TrainConfig(task="instruction").resolved().eval_batch_size == 16  # vocabulary-wide logits
    assert TrainConfig(task="lm", eval_batch_size=4).resolved().eval_batch_size == 4
    with pytest.raises(ConfigError, match="eval_batch_size"):
        TrainConfig(eval_batch_size=0).validate()
    with pytest.raises(ConfigError, match="head_lr"):
        TrainConfig(head_lr=-1.0).validate()


def test_method_training_options_under_the_users():
    assert TrainConfig(method="lora").resolved().method_options == {"targets": "all-linear"}
    assert TrainConfig(method="lora", method_options={"r": 4}).resolved().method_options == {"targets": "all-linear",
                                                                                             "r": 4}
    mine = {"targets": ["query", "value"]}
    assert TrainConfig(method="lora", method_options=mine).resolved().method_options == mine
    assert TrainConfig(method="ia3").resolved().method_options == {}


def test_base_dropout_is_the_methods_choice_unless_set():
    assert TrainConfig().resolved().base_dropout is None  # LoRA: the model's own dropout
    assert TrainConfig(method="prompt_tuning").resolved().base_dropout == 0.0
    assert TrainConfig(method="prompt_tuning", base_dropout=0.1).resolved().base_dropout == 0.1
    assert TrainConfig(method="lora", base_dropout=0.0).resolved().base_dropout == 0.0
    for bad in (-0.1, 1.0, "none"):
        with pytest.raises(ConfigError, match="base_dropout must be in"):
            TrainConfig(base_dropout=bad).validate()
