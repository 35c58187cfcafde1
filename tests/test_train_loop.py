"""peftkit's trainer on tiny models: learning, files, exact resume, accumulation, best/early stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import adapter_tensors, save_tiny_bert

import peftkit
from peftkit.train.checkpoint import CheckpointError
from peftkit.train.config import TrainConfig
from peftkit.train.run import train
from peftkit.train.trainer import Interrupted, Trainer

RUN_DEFAULTS = dict(batch_size=8, max_steps=12, lr=5e-3, progress=False, eval_fraction=0.25, seed=1)


def run(out: Path, model: Path, data: Path, **options) -> dict:
    base = dict(RUN_DEFAULTS, model=str(model), data=str(data), out=str(out))
    base.update(options)
    return train(TrainConfig(**base), echo=lambda _s: None)


def test_trains_saves_and_reloads(tmp_path, bert_dir, sentiment_csv) -> None:
    # 80 steps at 5e-3 learn the toy task on seeds 1-4 (40 steps at 2e-2 fail on some batch orders)
    result = run(tmp_path / "r", bert_dir, sentiment_csv, max_steps=80, lr=5e-3,
                 method_options={"targets": "all-linear"})
    out = tmp_path / "r"
    assert result["metrics"]["loss"] < result["metrics_before"]["loss"]
    assert result["trainable_params"] > 0 and result["adapter_bytes"] > 0 and result["train_seconds"] > 0
    assert {"adapter", "checkpoint", "run.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "run.json").read_text())
    assert meta["data"]["eval_examples"] > 0 and meta["data"]["eval_digest"] and meta["result"]["steps"] == 80
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in logged) and any("tokens_per_s" in r for r in logged)
    # the saved adapter reproduces the run's held-out numbers on a fresh base
    from transformers import AutoModelForSequenceClassification

    from peftkit.train import data as data_mod
    from peftkit.train.models import tokenizer
    from peftkit.train.trainer import evaluate

    tuned = peftkit.load(AutoModelForSequenceClassification.from_pretrained(bert_dir), out / "adapter")
    tok = tokenizer(str(bert_dir))
    cfg = TrainConfig(task="classification", eval_fraction=0.25).resolved()
    prep = data_mod.prepare(cfg, tok, "classification", data_mod.load_source(str(sentiment_csv), {}))
    again = evaluate(tuned, prep.eval, "classification", num_labels=2, pad_id=tok.pad_token_id)
    assert again["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert again["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)


def test_seed_covers_a_new_task_head(tmp_path, sentiment_csv) -> None:
    encoder = save_tiny_bert(tmp_path / "encoder", head=False)  # the classifier is created while loading
    opts = dict(max_steps=2, eval_fraction=0.25)
    runs = {name: run(tmp_path / name, encoder, sentiment_csv, seed=seed, **opts) for name, seed in
            [("a", 1), ("b", 1), ("c", 2)]}
    a, b, c = (adapter_tensors(tmp_path / name / "adapter") for name in runs)
    heads = [key for key in a if "classifier" in key]
    assert heads and all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in heads)


def _interrupt_at(monkeypatch, step: int) -> None:
    real = Trainer._agree

    def agree(self, local):
        return True if self.state["step"] == step else real(self, local)

    monkeypatch.setattr(Trainer, "_agree", agree)


def test_resume_is_bit_identical(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    opts = dict(max_steps=10, eval_every=3, method_options={"dropout": 0.1, "r": 4}, grad_accum=2, batch_size=4)
    run(tmp_path / "a", bert_dir, sentiment_csv, **opts)
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run(tmp_path / "b", bert_dir, sentiment_csv, **opts)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 4 and state["batch_in_epoch"] == 4
    monkeypatch.undo()
    # a fresh run on top of the unfinished one is refused; the checkpoint stays intact
    before = (tmp_path / "b" / "checkpoint" / "adapter.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="unfinished run.*--resume"):
        run(tmp_path / "b", bert_dir, sentiment_csv, **opts)
    assert (tmp_path / "b" / "checkpoint" / "adapter.safetensors").read_bytes() == before
    lines: list[str] = []
    resumed = train(TrainConfig(**{**RUN_DEFAULTS, "model": str(bert_dir), "data": str(sentiment_csv),
                                   "out": str(tmp_path / "b"), "resume": "auto", **opts}), echo=lines.append)
    a, b = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["steps"] == 10
    # the summary's time line: training time over all 10 steps, "this process" only the 6 it ran
    timing = next(line for line in lines if "train time" in line)
    assert "(10 steps, resumed at step 4)" in timing and "this process: 6 steps" in timing


def _run_and_interrupt_under_pools_of_2(tmp_path, bert_dir, sentiment_csv, monkeypatch, step, **opts) -> None:
    """Under pools of 2 (an older default): run "a" to the end and run "b" until it is interrupted at `step`;
    today's default is back afterwards."""
    from peftkit.train import batches

    monkeypatch.setitem(batches.POOL_BATCHES, "sequence", 2)
    run(tmp_path / "a", bert_dir, sentiment_csv, **opts)
    _interrupt_at(monkeypatch, step)
    with pytest.raises(Interrupted):
        run(tmp_path / "b", bert_dir, sentiment_csv, **opts)
    monkeypatch.undo()


def test_a_run_resumes_with_the_pool_size_it_started_with(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    """A checkpoint written under another default pool size (an older peftkit) continues with its own batch
    order, so the finished run is the one it would have been uninterrupted."""
    from peftkit.train import batches

    opts = dict(max_steps=10, batch_size=4)
    default = batches.POOL_BATCHES["sequence"]
    _run_and_interrupt_under_pools_of_2(tmp_path, bert_dir, sentiment_csv, monkeypatch, 4, **opts)
    assert batches.POOL_BATCHES["sequence"] == default != 2
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())
    assert state["identity"]["batch_order"] == "length-sorted pools of 2"
    resumed = run(tmp_path / "b", bert_dir, sentiment_csv, resume="auto", **opts)
    assert resumed["steps"] == 10
    a, b = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    run(tmp_path / "c", bert_dir, sentiment_csv, **opts)  # today's default order trains to another result
    c = adapter_tensors(tmp_path / "c" / "adapter")
    assert not all(torch.equal(a[key], c[key]) for key in a)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())
    assert state["identity"]["batch_order"] == "length-sorted pools of 2"  # and it records it again


def test_a_resumed_data_calibrated_run_keeps_the_masks_it_started_with(tmp_path, bert_dir, sentiment_csv,
                                                                        monkeypatch) -> None:
    """The resuming process calibrates again, on the batches the run started with (the pool size its checkpoint
    records, not today's default), so its masks, and the optimizer state's shapes, are the run's own and the
    run ends as it would have uninterrupted."""
    opts = dict(max_steps=6, batch_size=4, method="sparse_adapter", calibration_batches=2,
                method_options={"sparsity": 0.5, "score": "snip"})
    _run_and_interrupt_under_pools_of_2(tmp_path, bert_dir, sentiment_csv, monkeypatch, 3, **opts)
    run(tmp_path / "b", bert_dir, sentiment_csv, resume="auto", **opts)
    run(tmp_path / "c", bert_dir, sentiment_csv, **opts)  # today's order calibrates to other masks
    a, b, c = (adapter_tensors(tmp_path / name / "adapter") for name in "abc")
    masks = [key for key in a if "mask" in key]
    assert masks and a.keys() == b.keys()
    assert not all(torch.equal(a[key], c[key]) for key in masks)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_recorded_batch_order_reads_back() -> None:
    from peftkit.train.batches import batch_order, recorded_pool

    assert recorded_pool(batch_order(True, 16)) == 16 and recorded_pool(batch_order(True, 4)) == 4
    for unreadable in (batch_order(False, 16), "length-sorted pools of 0", "length-sorted pools of x", None, 4,
                       "length-sorted pools of 4 extra"):
        assert recorded_pool(unreadable) is None


def test_resume_refuses_other_settings(tmp_path, bert_dir, sentiment_csv) -> None:
    run(tmp_path / "a", bert_dir, sentiment_csv, max_steps=2)
    with pytest.raises(CheckpointError, match="different run.*seed"):
        run(tmp_path / "a", bert_dir, sentiment_csv, max_steps=4, seed=7, resume="auto")
    with pytest.raises(CheckpointError, match="different run.*batch_order"):  # another order would repeat examples
        run(tmp_path / "a", bert_dir, sentiment_csv, max_steps=4, group_by_length=False, resume="auto")
    state_file = tmp_path / "a" / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    del state["identity"]["batch_order"]  # as written before the batch order was recorded (version 1: no checksums)
    state["version"] = 1
    del state["sha256"], state["files"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="batch_order: 'not recorded"):
        run(tmp_path / "a", bert_dir, sentiment_csv, max_steps=4, resume="auto")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path / "new", bert_dir, sentiment_csv, resume="auto")


def test_inputs_kept_or_rebuilt_train_the_same(tmp_path, bert_dir, sentiment_csv) -> None:
    """--no-rebuild-inputs keeps LoRA's inputs instead of rebuilding them in backward: bit for bit the same run."""
    options = {"method_options": {"targets": "all-linear"}, "max_steps": 5}
    run(tmp_path / "rebuilt", bert_dir, sentiment_csv, **options)
    run(tmp_path / "kept", bert_dir, sentiment_csv, rebuild_inputs=False, **options)
    a, b = adapter_tensors(tmp_path / "rebuilt" / "adapter"), adapter_tensors(tmp_path / "kept" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_equals_big_batch(tmp_path, bert_dir, sentiment_csv) -> None:
    run(tmp_path / "big", bert_dir, sentiment_csv, batch_size=8, max_steps=5)
    run(tmp_path / "acc", bert_dir, sentiment_csv, batch_size=4, grad_accum=2, max_steps=5)
    a, b = adapter_tensors(tmp_path / "big" / "adapter"), adapter_tensors(tmp_path / "acc" / "adapter")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_instruction_tuning_lowers_loss(tmp_path, llama_dir, chat_jsonl) -> None:
    result = run(tmp_path / "chat", llama_dir, chat_jsonl, task="instruction", max_steps=30, lr=2e-2,
                 eval_data=str(chat_jsonl), method_options={"targets": "all-linear"})
    assert result["task"] == "instruction"
    assert result["metrics"]["loss"] < 0.3 * result["metrics_before"]["loss"]
    assert result["metrics"]["perplexity"] > 1


def test_best_adapter_and_early_stopping(tmp_path, bert_dir, sentiment_csv) -> None:
    from peftkit.train import data as data_mod
    from peftkit.train.models import load, tokenizer

    tok = tokenizer(str(bert_dir))
    cfg = TrainConfig(task="classification", early_stopping=2, eval_every=1).resolved()
    prep = data_mod.prepare(cfg, tok, "classification", data_mod.load_source(str(sentiment_csv), {}))
    tuned = peftkit.attach(load(str(bert_dir), "classification", 2), peftkit.config("lora"))
    saved = []
    trainer = Trainer(tuned, prep, cfg, out=tmp_path, pad_id=0, save_best=lambda: saved.append(1))
    assert not trainer._after_eval(1, {"accuracy": 0.6})
    assert not trainer._after_eval(2, {"accuracy": 0.7})
    assert not trainer._after_eval(3, {"accuracy": 0.65})
    assert trainer._after_eval(4, {"accuracy": 0.7})  # no improvement twice: stop
    assert trainer.state["best"] == {"step": 2, "metric": "accuracy", "value": 0.7} and len(saved) == 2


def test_eval_every_keeps_best_folder(tmp_path, bert_dir, sentiment_csv) -> None:
    result = run(tmp_path / "r", bert_dir, sentiment_csv, max_steps=6, eval_every=2, load_best=True)
    assert (tmp_path / "r" / "best" / "adapter.json").is_file()
    assert result["best"]["metric"] == "accuracy"
    assert result["metrics"]["accuracy"] == pytest.approx(result["best"]["value"])


def test_quantized_base_trains(tmp_path, bert_dir, sentiment_csv) -> None:
    result = run(tmp_path / "q", bert_dir, sentiment_csv, quantize="int8", max_steps=4)
    assert result["steps"] == 4 and result["metrics"]["loss"] > 0
    meta = json.loads((tmp_path / "q" / "run.json").read_text())
    assert meta["config"]["quantize"] == "int8"


def test_data_calibrated_method_is_calibrated_before_training(tmp_path, bert_dir, sentiment_csv) -> None:
    lines = []
    result = train(TrainConfig(model=str(bert_dir), data=str(sentiment_csv), out=str(tmp_path / "s"), batch_size=8,
                               max_steps=3, progress=False, method="sparse_adapter",
                               method_options={"sparsity": 0.5, "score": "snip"}, calibration_batches=2),
                   echo=lines.append)
    assert result["steps"] == 3
    assert any("calibrated default on 2 training batches" in line for line in lines)


def test_head_lr_puts_the_task_head_in_its_own_group(bert_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.trainer import head_parameters, param_groups

    tuned = peftkit.attach(AutoModelForSequenceClassification.from_pretrained(bert_dir), peftkit.config("prefix_tuning"))
    params = [p for p in tuned.parameters() if p.requires_grad]
    head = head_parameters(tuned)
    assert head and {p.shape for p in head} == {p.shape for p in tuned.model.classifier.parameters()}
    one = param_groups(tuned, params, "default", TrainConfig(lr=1e-3).resolved())
    assert len(one) == 1 and len(one[0]["params"]) == len(params)
    two = param_groups(tuned, params, "default", TrainConfig(lr=1e-3, head_lr=1e-2).resolved())
    assert [g["lr"] for g in two] == [1e-3, 1e-2]
    assert {id(p) for p in two[1]["params"]} == {id(p) for p in head}
    assert len(two[0]["params"]) + len(two[1]["params"]) == len(params)


def test_head_lr_trains_the_head_faster(tmp_path, bert_dir, sentiment_csv) -> None:
    from transformers import AutoModelForSequenceClassification

    start = AutoModelForSequenceClassification.from_pretrained(bert_dir).classifier.weight.detach()  # saved, not random

    def head_change(out: Path, **options) -> float:
        run(out, bert_dir, sentiment_csv, method="prefix_tuning", lr=1e-4, max_steps=4, **options)
        (weight,) = [v for k, v in adapter_tensors(out / "adapter").items() if "classifier" in k and "weight" in k]
        return float((weight.float() - start).abs().sum())

    # without head_lr the head would take prefix_tuning's recommended 1e-2, so set both rates
    assert head_change(tmp_path / "b", head_lr=1e-1) > 10 * head_change(tmp_path / "a", head_lr=1e-4)


def test_resume_with_another_head_group_is_a_clear_error(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    opts = dict(max_steps=6, method_options={"r": 4})
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(tmp_path / "r", bert_dir, sentiment_csv, **opts)
    monkeypatch.undo()
    before = (tmp_path / "r" / "checkpoint" / "adapter.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="--head-lr"):
        run(tmp_path / "r", bert_dir, sentiment_csv, resume="auto", head_lr=5e-2, **opts)
    assert (tmp_path / "r" / "checkpoint" / "adapter.safetensors").read_bytes() == before


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_set_dropout_reaches_every_dropout(name) -> None:
    from models import BUILDERS, batch, output_tensor

    from peftkit.train.models import set_dropout

    model = BUILDERS[name]()
    for module in model.modules():  # every kind of dropout on, so that a missed one shows
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.5
    inputs = batch(name)
    model.train()
    torch.manual_seed(0)
    noisy = output_tensor(model(**inputs))
    assert not torch.equal(noisy, output_tensor(model(**inputs)))
    assert set_dropout(model, 0.0) > 0
    expected = output_tensor(model.eval()(**inputs))
    assert torch.equal(output_tensor(model.train()(**inputs)), expected)  # training forward = eval forward


def test_run_gives_the_base_the_methods_dropout(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    from peftkit.train import models

    seen: list[float] = []
    real = models.set_dropout
    monkeypatch.setattr(models, "set_dropout", lambda model, p: seen.append(p) or real(model, p))
    run(tmp_path / "a", bert_dir, sentiment_csv, method="prompt_tuning", max_steps=1)
    run(tmp_path / "b", bert_dir, sentiment_csv, method="lora", max_steps=1)
    run(tmp_path / "c", bert_dir, sentiment_csv, method="lora", max_steps=1, base_dropout=0.2)
    assert seen == [0.0, 0.2]  # the method's recommendation, nothing for LoRA, then the user's value
