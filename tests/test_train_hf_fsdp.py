"""PeftkitTrainer + PeftkitCallback under transformers.Trainer's FSDP2, in 2 CPU processes (gloo):
the adapter is gathered from the shards, written by rank 0 only, loads on one process, and equals
the adapter of the same training in one process at the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import adapter_tensors, free_port, process_env
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftkit
from peftkit.train import PeftkitCallback
from peftkit.train.fsdp import ShardingError

ROOT = Path(__file__).resolve().parents[1]
DRIVER = str(ROOT / "tests" / "hf_fsdp_driver.py")


def _env() -> dict[str, str]:
    return process_env()


def _run(*launch: str, args: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, *launch, DRIVER, *args], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')),
                  key=lambda r: r["rank"])


def _same(a: Path, b: Path) -> None:
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert x.keys() == y.keys() and x
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0)


def test_trainer_fsdp_adapter_equals_one_process(tmp_path, llama_dir) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    alone = _run(args=[str(llama_dir), str(one), "8"])
    ranks = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), args=[str(llama_dir), str(two), "8"])
    assert [r["fsdp"] for r in alone] == [False] and [r["fsdp"] for r in ranks] == [True, True]
    # rank 0 wrote every adapter folder (checkpoint-N/adapter by the callback, checkpoint-N and final by
    # the trainer), rank 1 none
    assert sorted(ranks[0]["written"]) == sorted(str(two / p) for p in [
        "checkpoint-2", "checkpoint-2/adapter", "checkpoint-4", "checkpoint-4/adapter", "final"])
    assert ranks[1]["written"] == []
    for folder in ["final", "checkpoint-4", "checkpoint-4/adapter", "checkpoint-2/adapter"]:
        _same(two / folder, one / folder)
    # the same file as one process writes: only the weights' own hashes differ (the base fingerprint too is equal)
    written, reference = (json.loads((d / "final" / "adapter.json").read_text()) for d in (two, one))
    assert {k for k in written if written[k] != reference[k]} <= {"files"}
    assert not list(two.rglob("*.tmp*"))
    # it loads on one process, onto a fresh base
    loaded = peftkit.load(AutoModelForCausalLM.from_pretrained(llama_dir), two / "final")
    ids = torch.randint(7, 38, (2, 8))
    reference_model = peftkit.load(AutoModelForCausalLM.from_pretrained(llama_dir), one / "final")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, reference_model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_callback_refuses_methods_that_cannot_shard(bert_dir) -> None:
    tuned = peftkit.attach(AutoModelForSequenceClassification.from_pretrained(bert_dir),
                           peftkit.config("adalora", total_steps=10))
    fsdp = SimpleNamespace(fsdp=True, fsdp_config={"version": 2}, process_index=0)
    with pytest.raises(ShardingError, match="adalora.*Trainer's FSDP"):
        PeftkitCallback().on_init_end(fsdp, None, None, model=tuned)
    PeftkitCallback().on_init_end(SimpleNamespace(fsdp=False, fsdp_config=None, process_index=0), None, None,
                                  model=tuned)
