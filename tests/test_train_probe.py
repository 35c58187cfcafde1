"""Linear-probe start of a new task head (train/probe.py): the fit, its use by the trainer, its limits."""

from __future__ import annotations

import torch
from support import save_tiny_bert
from test_train_loop import run

import peftkit
from peftkit.train import data as data_mod
from peftkit.train.config import TrainConfig
from peftkit.train.models import tokenizer
from peftkit.train.probe import fit_logistic, probe_head


def test_fit_logistic_works_on_the_raw_feature_scale() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 4, generator=g) * torch.tensor([1.0, 10.0, 100.0, 0.1]) + 50.0
    x[:, 3] += 0.5 * y  # the classes differ only along the smallest-scale feature
    weight, bias = fit_logistic(x, y, 3)
    assert weight.shape == (3, 4) and bias.shape == (3,)
    assert ((x @ weight.T + bias).argmax(1) == y).float().mean() > 0.95


def test_probed_head_starts_better_than_a_random_one(tmp_path, sentiment_csv) -> None:
    encoder = save_tiny_bert(tmp_path / "encoder", head=False)  # a new head, as for all-MiniLM-L6-v2
    opts = dict(max_steps=1, lr=1e-9, eval_fraction=0.25, method="prompt_tuning")
    probed = run(tmp_path / "p", encoder, sentiment_csv, probe_head=True, **opts)
    random_head = run(tmp_path / "r", encoder, sentiment_csv, probe_head=False, **opts)
    assert probed["metrics_before"]["loss"] < random_head["metrics_before"]["loss"]
    assert probed["metrics_before"]["accuracy"] > random_head["metrics_before"]["accuracy"]


def test_a_saved_head_is_not_probed(tmp_path, bert_dir, sentiment_csv) -> None:
    opts = dict(max_steps=1, lr=1e-9, eval_fraction=0.25, method="prompt_tuning")
    kept = run(tmp_path / "k", bert_dir, sentiment_csv, probe_head=True, **opts)
    plain = run(tmp_path / "p", bert_dir, sentiment_csv, probe_head=False, **opts)
    assert kept["metrics_before"] == plain["metrics_before"]


def test_probe_is_the_methods_choice_unless_set() -> None:
    assert TrainConfig(method="prompt_tuning").resolved().probe_head is True
    assert TrainConfig(method="prompt_tuning", probe_head=False).resolved().probe_head is False
    assert TrainConfig(method="lora").resolved().probe_head is False
    assert TrainConfig(method="lora", probe_head=True).resolved().probe_head is True


def test_decoder_classifier_heads_are_left_alone(llama_dir, sentiment_csv) -> None:
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer(str(llama_dir))
    model = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    tuned = peftkit.attach(model, peftkit.config("prompt_tuning"))
    cfg = TrainConfig(task="classification", eval_fraction=0.25).resolved()
    prepared = data_mod.prepare(cfg, tok, "classification", data_mod.load_source(str(sentiment_csv), {}))
    before = {k: v.clone() for k, v in tuned.adapter_state("default").items()}
    message = probe_head(tuned, prepared, tok.pad_token_id, "cpu", seed=0)
    assert message.startswith("head not probed") and "per-token" in message
    after = tuned.adapter_state("default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_causal_lm_has_no_head_to_probe(llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    tuned = peftkit.attach(AutoModelForCausalLM.from_pretrained(llama_dir), peftkit.config("prompt_tuning"))
    assert probe_head(tuned, None, 0, "cpu", seed=0) == "no task head to probe"
