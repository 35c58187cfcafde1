"""``peftkit bench``: end to end on the tiny models, resume after an interrupt, one-line errors, and the
measures (forgetting, the aggregate over seeds, the Pareto front) checked on hand-made cases."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from support import sentiment_rows, write_jsonl
from torch import nn

from peftkit import cli
from peftkit.bench import BenchSettings, aggregate, forgetting, make_plan, plots, run_bench
from peftkit.bench import worker as worker_mod
from peftkit.bench.presets import PRESETS
from peftkit.bench.record import BenchError
from peftkit.bench.spec import parse_methods, split_entries
from peftkit.errors import ConfigError


def _settings(bert_dir, sentiment_csv, chat_jsonl, **changes) -> BenchSettings:
    base = {"model": str(bert_dir), "data": str(sentiment_csv), "max_steps": 2, "batch_size": 8,
            "forgetting_data": str(chat_jsonl), "forgetting_examples": 6}
    return BenchSettings(**{**base, **changes})


def _json_tail(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_bench(tmp_path_factory, bert_dir, sentiment_csv, chat_jsonl) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "cls"
    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl), methods=["lora:r=4,full,head-only"], seeds=2)
    return out, run_bench(plan, out, progress=False, isolated=False, echo=lambda s: None)


def test_classifier_bench_writes_records_table_csv_and_plots(cls_bench):
    out, doc = cls_bench
    records = sorted(p.name for p in (out / "records").iterdir())
    assert records == [f"{e}-seed{s}.json" for e in ("full", "head-only", "lora_r_4") for s in (0, 1)]
    base = json.loads((out / "base.json").read_text())
    assert base["metric"] == "accuracy" and 0 <= base["value"] <= 1
    assert base["forgetting"]["measure"] == "retrieval" and base["forgetting"]["examples"] == 6
    rec = {(r["label"], r["seed"]): r for r in (json.loads(p.read_text()) for p in (out / "records").iterdir())}
    full, head, lora = rec["full", 0], rec["head-only", 0], rec["lora:r=4", 1]
    model = base["params"]
    assert full["params"]["trainable"] == model and full["params"]["percent"] == pytest.approx(100.0)
    assert head["params"]["trainable_without_head"] == 0 and 0 < head["params"]["head"] < model
    assert 0 < lora["params"]["trainable_without_head"] < model and lora["spec"]["options"] == {"r": 4}
    for r in rec.values():
        assert r["time"]["steps"] == 2 and r["time"]["step_seconds"] > 0 and r["adapter_bytes"] > 0
        assert r["memory"]["peak_rss_bytes"] > 0 and r["memory"]["saved_for_backward_bytes"] > 0
        assert r["forgetting"]["base"] == base["forgetting"]["base"]
        assert r["forgetting"]["lost"] == pytest.approx(r["forgetting"]["base"] - r["forgetting"]["after"])
    assert head["forgetting"]["lost"] == 0.0  # the backbone is untouched: its embeddings are the base's exactly
    assert full["adapter_bytes"] > lora["adapter_bytes"] > head["adapter_bytes"]
    assert not (out / "runs" / "full-seed0" / "checkpoint").exists()  # finished: the resume state is dropped

    rows = {r["label"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["lora:r=4", "full", "head-only"]
    accs = [rec["lora:r=4", s]["value"] for s in (0, 1)]
    assert float(rows["lora:r=4"]["value_mean"]) == pytest.approx(sum(accs) / 2)
    assert float(rows["full"]["vs_full"]) == 0.0 and float(rows["full"]["rss_vs_full"]) == 1.0
    table = (out / "results.md").read_text()
    assert "| lora:r=4 | reparameterized | 2 |" in table and "| full | baseline | 2 |" in table
    for name in ("quality_vs_params", "gain_vs_forgetting", "cost"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["records"] == doc["runs"] == 6 and doc["failed"] == []


def test_language_model_bench_has_prompted_baselines_and_perplexity_forgetting(tmp_path, llama_dir, chat_jsonl,
                                                                                sentiment_csv):
    text = tmp_path / "general.txt"
    text.write_text("\n".join(f"the story was very good and the plot {i} was great" for i in range(40)))
    settings = BenchSettings(model=str(llama_dir), data=str(chat_jsonl), task="instruction", max_steps=2,
                             batch_size=8, forgetting_data=str(text), forgetting_examples=4)
    plan = make_plan(settings, methods=["lora", "zero-shot", "few-shot:k=2"], seeds=2)
    assert [(s.label, seed) for s, seed in plan.runs()] == [
        ("lora", 0), ("lora", 1), ("zero-shot", 0), ("few-shot:k=2", 0), ("few-shot:k=2", 1)]  # zero-shot: once
    doc = run_bench(plan, tmp_path / "out", progress=False, isolated=False, echo=lambda s: None)
    base = doc["base"]
    assert base["metric"] == "loss" and base["forgetting"]["measure"] == "perplexity"
    rows = {r["label"]: r for r in doc["rows"]}
    # zero-shot on instruction data is the untrained model's held-out loss, exactly
    assert rows["zero-shot"]["value_mean"] == pytest.approx(base["value"])
    assert rows["zero-shot"]["forgetting_mean"] == 0.0 and rows["zero-shot"]["trainable"] == 0
    assert math.isfinite(rows["few-shot:k=2"]["value_mean"]) and rows["few-shot:k=2"]["seeds"] == 2
    lora = json.loads((tmp_path / "out" / "records" / "lora-seed0.json").read_text())
    assert lora["forgetting"]["lost"] == pytest.approx(lora["forgetting"]["after"] - lora["forgetting"]["base"])


def test_prompted_classification_scores_label_names_by_likelihood(tmp_path, llama_dir, sentiment_csv, chat_jsonl):
    settings = BenchSettings(model=str(llama_dir), data=str(sentiment_csv), task="classification", max_steps=2,
                             batch_size=8, max_eval_examples=6, forgetting_data=str(chat_jsonl),
                             forgetting_examples=2)
    plan = make_plan(settings, methods=["zero-shot", "few-shot:k=2", "head-only"], seeds=1)
    doc = run_bench(plan, tmp_path / "out", progress=False, isolated=False, echo=lambda s: None)
    rows = {r["label"]: r for r in doc["rows"]}
    for label in ("zero-shot", "few-shot:k=2"):
        record = json.loads((tmp_path / "out" / "records" / f"{label.replace(':', '_').replace('=', '_')}-seed0.json")
                            .read_text())
        assert record["metrics"]["examples"] == 6 and rows[label]["value_mean"] in {i / 6 for i in range(7)}


# -- stop and continue ---------------------------------------------------------------------------------------
def test_interrupted_bench_continues_without_repeating_finished_runs(tmp_path, bert_dir, sentiment_csv, chat_jsonl,
                                                                     monkeypatch):
    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl), methods=["head-only", "bitfit:biases=all"], seeds=1)
    out = tmp_path / "b"
    real = worker_mod.execute
    calls: list[str] = []

    def stop_after_two(job):
        calls.append(job["kind"] + ":" + (job.get("spec") or {}).get("label", "") + f":{job['seed']}")
        if len(calls) == 3:  # base, head-only, then Ctrl-C during bitfit
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(worker_mod, "execute", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_bench(plan, out, progress=False, isolated=False, echo=lambda s: None)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    assert list(done) == ["head-only-seed0.json"]

    calls.clear()
    monkeypatch.setattr(worker_mod, "execute", lambda job: calls.append(job["kind"]) or real(job))
    doc = run_bench(plan, out, progress=False, isolated=False, echo=lambda s: None)
    assert calls == ["run"]  # bitfit only: not the base, not head-only
    assert (out / "records" / "head-only-seed0.json").stat().st_mtime_ns == done["head-only-seed0.json"]
    assert doc["continued"] and doc["records"] == 2 and len(list((out / "records").iterdir())) == 2

    calls.clear()  # a third time: everything is done, only the aggregate is written again
    assert run_bench(plan, out, progress=False, isolated=False, echo=lambda s: None)["records"] == 2
    assert calls == []


def test_a_run_stopped_while_it_is_measured_is_not_trained_again(tmp_path, bert_dir, sentiment_csv, chat_jsonl,
                                                                 monkeypatch):
    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl), methods=["lora"], seeds=1)
    real_measure, real_train = forgetting.measure, worker_mod.train
    measured, trained = [], []

    def stop_measuring_the_run(model, probe, pad_id):
        measured.append(1)
        if len(measured) == 2:  # the first is the base model's
            raise KeyboardInterrupt
        return real_measure(model, probe, pad_id)

    monkeypatch.setattr(forgetting, "measure", stop_measuring_the_run)
    monkeypatch.setattr(worker_mod, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        run_bench(plan, tmp_path / "b", progress=False, isolated=False, echo=lambda s: None)
    assert trained == [1] and not (tmp_path / "b" / "records").exists()
    monkeypatch.setattr(forgetting, "measure", real_measure)
    doc = run_bench(plan, tmp_path / "b", progress=False, isolated=False, echo=lambda s: None)
    assert trained == [1] and doc["records"] == 1  # measured from the saved adapter, not trained twice


def test_cli_writes_a_bench_and_refuses_one_with_other_settings(tmp_path, bert_dir, sentiment_csv, chat_jsonl,
                                                                capsys):
    out = tmp_path / "cli"
    argv = ["bench", "--model", str(bert_dir), "--data", str(sentiment_csv), "--forgetting-data", str(chat_jsonl),
            "--forgetting-examples", "4", "--methods", "head-only", "--seeds", "1", "--batch-size", "8", "--out",
            str(out), "--threads", "1", "--no-progress", "--no-isolate"]
    assert cli.main([*argv, "--max-steps", "1", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out.strip().splitlines()[-1])
    assert doc["records"] == 1 and doc["rows"][0]["label"] == "head-only" and captured.err == ""
    assert "| head-only | baseline | 1 |" in captured.out

    assert cli.main([*argv, "--max-steps", "2", "--json"]) == 1  # another step budget: another bench
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "holds a bench with other settings (max_steps: 1 there, 2 now)" in err[0]
    assert json.loads(captured.out.strip().splitlines()[-1])["error"]["type"] == "BenchError"


def test_a_run_in_its_own_process_reports_its_error_and_the_bench_goes_on(tmp_path, bert_dir, sentiment_csv,
                                                                          chat_jsonl):
    from peftkit.bench import runner

    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl), methods=["head-only"], seeds=1)
    job = runner._job(plan, tmp_path, "run", plan.specs[0], 0)  # no base.json yet: the worker refuses
    with pytest.raises(runner.RunFailed, match="base.json is missing"):
        runner._execute({**job, "base": str(tmp_path / "base.json")}, isolated=True)
    assert worker_mod.main([json.dumps(job)]) == 1


# -- bad arguments: one line each, nothing written ----------------------------------------------------------
@pytest.mark.parametrize(("model", "data", "extra", "message"), [
    ("bert", "sent", ["--methods", "loraa"], r"unknown method or baseline 'loraa'.*Did you mean: lora"),
    ("bert", "sent", ["--methods", "zero-shot"], "zero-shot prompts the base model.*causal language model"),
    ("bert", "sent", ["--methods", "few-shot:k=0"], "k must be a positive integer"),
    ("bert", "sent", ["--methods", "lora:rank=8"], "lora:rank=8"),
    ("bert", "sent", ["--methods", "full:lr=-1"], "lr must be a number > 0"),
    ("llama", "chat", ["--methods", "head-only", "--task", "instruction"], "head-only trains the task head alone"),
    ("llama", "chat", ["--methods", "bitfit", "--task", "instruction"], "bitfit"),
    ("bert", "both", ["--methods", "lora"], "forgetting is measured on data the task does not train on"),
])
def test_bad_arguments_are_one_line_errors(model, data, extra, message, tmp_path, bert_dir, llama_dir,
                                           sentiment_csv, chat_jsonl, capsys):
    models = {"bert": bert_dir, "llama": llama_dir}
    both = write_jsonl(tmp_path / "both.jsonl", [{**r, "prompt": r["text"], "response": str(r["label"])}
                                                 for r in sentiment_rows(32)])
    datas = {"sent": ["--data", str(sentiment_csv), "--forgetting-data", str(chat_jsonl)],
             "chat": ["--data", str(chat_jsonl)],
             "both": ["--data", str(both), "--forgetting-data", str(both)]}
    out = tmp_path / "never"
    rc = cli.main(["bench", "--model", str(models[model]), *datas[data], *extra, "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "Traceback" not in err[0]
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_an_out_folder_holding_other_files_is_refused(tmp_path, bert_dir, sentiment_csv, chat_jsonl):
    (tmp_path / "notes.txt").write_text("mine")
    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl), methods=["head-only"], seeds=1)
    with pytest.raises(BenchError, match="not a bench's.*notes.txt"):
        run_bench(plan, tmp_path, progress=False, isolated=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_methods_entries_split_on_commas_and_keep_their_options():
    assert split_entries(["lora:r=16,alpha=32,bitfit", "sparse_adapter:sparsity=0.8", "full"]) == [
        "lora:r=16,alpha=32", "bitfit", "sparse_adapter:sparsity=0.8", "full"]
    specs = parse_methods(["lora:r=16,alpha=32,lr=1e-3", "head-only", "lora:r=16,alpha=32"])
    assert [(s.label, s.method, s.options, s.train) for s in specs] == [
        ("lora:r=16,alpha=32,lr=1e-3", "lora", {"r": 16, "alpha": 32}, {"lr": 1e-3}),
        ("head-only", "head_only", {}, {}), ("lora:r=16,alpha=32", "lora", {"r": 16, "alpha": 32}, {})]
    with pytest.raises(ConfigError, match="few-shot takes only k"):
        parse_methods(["few-shot:r=2"])


def test_quick_preset_runs_one_method_per_family_and_the_baselines_that_fit(bert_dir, sentiment_csv, chat_jsonl):
    plan = make_plan(_settings(bert_dir, sentiment_csv, chat_jsonl))
    families = {s.family for s in plan.specs}
    assert families == {"additive", "reparameterized", "partial", "hybrid", "unified", "baseline"}
    assert [s.label for s in plan.specs if s.family == "baseline"] == ["full", "head-only"]  # no prompting an encoder
    assert plan.seeds == PRESETS["quick"].seeds == 2 and plan.settings.max_eval_examples == 1000
    assert any("zero-shot" in n for n in plan.notes)


# -- the measures on hand-checkable cases --------------------------------------------------------------------
class OneHot(nn.Module):
    """Token t embeds as the unit vector e_t: mean pooling and cosine similarity can be done by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(vocab))

    def forward(self, input_ids, attention_mask, output_hidden_states):
        from types import SimpleNamespace

        return SimpleNamespace(hidden_states=(self.embed(input_ids),))


def test_retrieval_recall_at_1_by_hand():
    # q0 = mean(e0, e0, e1) is nearest a0 = e0 (cos 2/sqrt5 vs 1/sqrt5); q1 = e1 hits a1 = e1 only when the
    # padding (token 3) is masked out, else it would lean to a2 = e3; q2 = e2 is orthogonal to every answer
    # (a tie, argmax picks a0): a miss. Recall@1 = 2/3.
    probe = forgetting.Probe("retrieval", "hand", questions=[[0, 0, 1], [1], [2]], answers=[[0], [1], [3]])
    assert forgetting.measure(OneHot(4), probe, pad_id=3) == pytest.approx(2 / 3)
    assert forgetting.lost("retrieval", 2 / 3, 1 / 3) == pytest.approx(1 / 3)  # recall fell: that much forgotten
    assert forgetting.lost("perplexity", 10.0, 12.5) == 2.5  # perplexity rose: forgotten


def test_perplexity_is_exp_of_the_mean_token_loss(llama_dir):
    from transformers import AutoModelForCausalLM

    from peftkit.train import models

    tok = models.tokenizer(str(llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    blocks = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    from peftkit.train.data import Encoded

    probe = forgetting.Probe("perplexity", "hand", blocks=Encoded.from_lists(blocks, blocks, per_token=True))
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(model(torch.tensor([b])).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, torch.tensor(b[1:]).unsqueeze(-1)).sum())
            count += len(b) - 1
    assert forgetting.measure(model, probe, tok.pad_token_id) == pytest.approx(math.exp(nll / count), rel=1e-4)


def _record(label, method, seed, value, lost, *, trainable=100, head=10, bytes_=400, rss=1000.0, saved=50, step=0.5):
    return {"label": label, "method": method, "family": "baseline" if method == "full" else "reparameterized",
            "seed": seed, "value": value, "params": {"trainable": trainable, "trainable_without_head": trainable - head,
                                                     "percent": 100 * trainable / 1000},
            "adapter_bytes": bytes_, "memory": {"peak_rss_bytes": rss, "saved_for_backward_bytes": saved},
            "time": {"step_seconds": step, "wall_seconds": 10.0 * (seed + 1)},
            "forgetting": {"measure": "retrieval", "lost": lost}}


def test_aggregate_mean_std_and_ratios_by_hand():
    base = {"metric": "accuracy", "value": 0.5, "params": 1000,
            "forgetting": {"measure": "retrieval", "describe": "d", "base": 0.4}, "data": {"eval_examples": 10}}
    records = [_record("full", "full", 0, 0.80, 0.10, trainable=1000, bytes_=4000, rss=2000.0),
               _record("full", "full", 1, 0.90, 0.20, trainable=1000, bytes_=4000, rss=2000.0),
               _record("lora", "lora", 0, 0.70, 0.00, bytes_=400, rss=1000.0),
               _record("lora", "lora", 1, 0.80, 0.06, bytes_=400, rss=1500.0)]
    rows = {r["label"]: r for r in aggregate.rows(records, base, ["lora", "full", "absent"])}
    assert list(rows) == ["lora", "full"]
    lora, full = rows["lora"], rows["full"]
    assert full["value_mean"] == pytest.approx(0.85) and full["value_std"] == pytest.approx(math.sqrt(0.005))
    assert lora["value_mean"] == pytest.approx(0.75) and lora["vs_full"] == pytest.approx(-0.10)
    assert lora["gain_mean"] == pytest.approx(0.25) and full["vs_full"] == 0.0
    assert lora["file_vs_model"] == pytest.approx(400 / 4000) and full["file_vs_model"] == pytest.approx(1.0)
    assert lora["rss_vs_full"] == pytest.approx(1250 / 2000)
    assert lora["forgetting_mean"] == pytest.approx(0.03) and lora["forgetting_std"] == pytest.approx(math.sqrt(0.0018))
    assert lora["forgetting_vs_full"] == pytest.approx(0.03 / 0.15)
    assert lora["wall_seconds"] == pytest.approx(15.0) and lora["trainable_without_head"] == 90
    table = aggregate.markdown(list(rows.values()), base)
    assert "| lora | reparameterized | 2 | 0.7500 ± 0.0707 | -0.1000 |" in table and "| 0.2× |" in table

    single = aggregate.rows(records[2:3], {**base, "metric": "loss"}, ["lora"])[0]  # lower is better: gain = base - value
    assert single["value_std"] is None and single["gain_mean"] == pytest.approx(0.5 - 0.70)
    assert single["vs_full"] is None and single["rss_vs_full"] is None


def test_pareto_front_by_hand():
    points = [(10, 0.80), (100, 0.85), (50, 0.70), (1000, 0.84), (5, 0.60), (10, 0.75)]
    assert plots.pareto(points, lower_is_better=False) == [4, 0, 1]
    assert plots.pareto([(10, 2.0), (100, 1.5), (50, 2.5), (5, 3.0)], lower_is_better=True) == [3, 0, 1]


def test_a_signal_to_the_bench_alone_stops_its_worker_with_a_checkpoint(tmp_path, bert_dir, sentiment_csv, chat_jsonl):
    """`kill <bench>` (SIGTERM to the parent process only, not its group): the worker running the training
    is told to finish its step and checkpoint, nothing keeps running, and the same command again resumes
    that run from its checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from support import process_env

    from peftkit.train.checkpoint import STATE

    out = tmp_path / "b"
    argv = [sys.executable, "-m", "peftkit", "bench", "--model", str(bert_dir), "--data", str(sentiment_csv),
            "--forgetting-data", str(chat_jsonl), "--forgetting-examples", "4", "--methods", "lora", "--seeds", "1",
            "--batch-size", "4", "--max-steps", "300", "--threads", "1", "--no-progress", "--out", str(out)]
    bench = subprocess.Popen(argv, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "runs" / "lora-seed0"
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() and bench.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # inside the training loop
    assert bench.poll() is None, bench.communicate()
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=300)
    assert bench.returncode == 130, err[-2000:]
    state = json.loads((run / "checkpoint" / STATE).read_text())
    assert not (out / "records").exists() and 0 < state["step"] < 300, err[-2000:]

    again = subprocess.run(argv + ["--json"], env=process_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    record = json.loads((out / "records" / "lora-seed0.json").read_text())
    assert record["resumed"] and record["time"]["steps"] == 300
