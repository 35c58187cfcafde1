"""Sharded training (--strategy fsdp) in real processes on CPU (gloo): 2 processes train like one at
the same global batch, sharded checkpoints resume on 1 and on 2 processes, two "nodes" equal one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support import adapter_tensors, free_port, process_env

from peftkit.train.checkpoint import CheckpointError, verify
from peftkit.train.config import TrainConfig
from peftkit.train.fsdp import ShardingError, check_method
from peftkit.train.run import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _env(tmp: Path) -> dict[str, str]:
    return process_env(PEFTKIT_CACHE=str(tmp / "cache"))


def _torchrun(tmp: Path, steps: list[dict[str, Any]], *launch: str) -> list[dict[str, Any]]:
    """Run tests/fsdp_driver.py's `steps` in 2 processes; the results rank 0 printed."""
    launch = launch or ("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / "tests" / "fsdp_driver.py"),
           json.dumps(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _cases(bert_dir: Path, llama_dir: Path, sentiment_csv: Path, chat_jsonl: Path) -> dict[str, dict[str, Any]]:
    bert = {"model": str(bert_dir), "data": str(sentiment_csv), "lr": 0.01}
    return {
        "lora": {**bert, "method": "lora"},
        "adapter": {**bert, "method": "adapter"},
        "prefix_tuning": {**bert, "method": "prefix_tuning"},
        "qlora": {"model": str(llama_dir), "data": str(chat_jsonl), "method": "qlora", "lr": 0.01},
        # 2 micro-batches of 2 per process; one process takes the same 4 micro-batches (a global batch is cut
        # into as many pieces as micro-batches, and an epoch's last batch with fewer examples is dropped)
        "lora-accumulated": {**bert, "method": "lora", "grad_accum": 2, "batch_size": 2},
    }


def _config(case: dict[str, Any], out: Path, batch: int, **extra: Any) -> dict[str, Any]:
    """A run of `case` with `batch` examples per process (unless the case sets its own)."""
    return {"batch_size": batch, **case, "out": str(out), "max_steps": STEPS, "seed": 1, "progress": False,
            "precision": "fp32", "eval_before": False, **extra}


def _last_loss(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][-1]


def _same_adapter(a: Path, b: Path) -> None:
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0)


def test_fsdp_trains_like_one_process(tmp_path, bert_dir, llama_dir, sentiment_csv, chat_jsonl) -> None:
    cases = _cases(bert_dir, llama_dir, sentiment_csv, chat_jsonl)
    steps = [{"config": _config(case, tmp_path / f"{name}-fsdp", 4, strategy="fsdp")} for name, case in cases.items()]
    results = _torchrun(tmp_path, steps)
    assert len(results) == len(cases)  # only rank 0 reports
    for (name, case), sharded in zip(cases.items(), results, strict=True):
        alone = {"grad_accum": 2 * case["grad_accum"]} if "grad_accum" in case else {}
        one = train(TrainConfig(**_config(case, tmp_path / f"{name}-one", 8, **alone)), echo=lambda _s: None)
        fsdp_out, one_out = tmp_path / f"{name}-fsdp", tmp_path / f"{name}-one"
        _same_adapter(fsdp_out / "adapter", one_out / "adapter")
        assert abs(_last_loss(fsdp_out) - _last_loss(one_out)) < 1e-5, name
        assert abs(sharded["metrics"]["loss"] - one["metrics"]["loss"]) < 1e-5, name
        run = json.loads((fsdp_out / "run.json").read_text())
        assert (run["world_size"], run["strategy"]) == (2, "fsdp")
        # the adapter file is today's format: the same files, and the same base fingerprint
        written = json.loads((fsdp_out / "adapter" / "adapter.json").read_text())
        reference = json.loads((one_out / "adapter" / "adapter.json").read_text())
        assert sorted(p.name for p in (fsdp_out / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]
        assert {k for k in written if written[k] != reference[k]} <= {"files"}


def test_sharded_checkpoint_resumes_on_one_and_two_processes(tmp_path, bert_dir, sentiment_csv) -> None:
    case = {"model": str(bert_dir), "data": str(sentiment_csv), "lr": 0.01, "method": "lora",
            "schedule": "constant", "warmup": 0.0}  # the first run's shorter schedule must not matter
    first, on_two, on_one = tmp_path / "first", tmp_path / "on-two", tmp_path / "on-one"
    _torchrun(tmp_path, [
        {"config": _config(case, first, 4, strategy="fsdp", max_steps=2)},
        {"copy": [str(first), str(on_one)]},
        {"copy": [str(first), str(on_two)]},
        {"config": _config(case, on_two, 4, strategy="fsdp", resume="auto")},
    ])
    doc = json.loads((first / "checkpoint" / "trainer.json").read_text())
    assert (doc["layout"], doc["step"]) == ("sharded", 2)
    assert len(list((first / "checkpoint" / "shards").glob("*.distcp"))) == 2  # one file per process
    assert not list(first.glob(".*tmp*"))
    resumed = train(TrainConfig(**_config(case, on_one, 8, resume="auto")), echo=lambda _s: None)
    whole = tmp_path / "whole"
    train(TrainConfig(**_config(case, whole, 8)), echo=lambda _s: None)
    assert resumed["steps"] == STEPS
    _same_adapter(on_one / "adapter", whole / "adapter")
    _same_adapter(on_two / "adapter", whole / "adapter")
    # a sharded checkpoint's adapter is an ordinary adapter folder
    _same_adapter(on_two / "checkpoint", on_two / "adapter")
    # every shard is covered by the recorded SHA-256s
    assert verify(first / "checkpoint")["step"] == 2
    shard = next((first / "checkpoint" / "shards").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify(first / "checkpoint")


def test_two_nodes_and_accelerate_launch_equal_one_process(tmp_path, bert_dir, sentiment_csv) -> None:
    case = {"model": str(bert_dir), "data": str(sentiment_csv), "lr": 0.01, "method": "lora"}
    out = tmp_path / "nodes"
    port = free_port()
    steps = json.dumps([{"config": _config(case, out, 4, strategy="fsdp")}])
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               str(ROOT / "tests" / "fsdp_driver.py"), steps]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=_env(tmp_path)))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-4000:]
    assert sum(line.startswith("{") for stdout, _ in outputs for line in stdout.splitlines()) == 1
    assert [list((tmp_path / f"node{n}").iterdir()) for n in (0, 1)] == [[], []]  # nothing written elsewhere
    # accelerate launch with peftkit's own flags (--multi_gpu: its multi-process launcher, CPUs included)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(free_port()), "-m", "peftkit", "train", "--model", str(bert_dir), "--data", str(sentiment_csv),
                  "--method", "lora", "--lr", "0.01", "--batch-size", "4", "--max-steps", str(STEPS), "--seed", "1",
                  "--precision", "fp32", "--no-eval-before", "--no-progress", "--strategy", "fsdp",
                  "--out", str(tmp_path / "accelerate")]
    done = subprocess.run(accelerate, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "accelerate" / "run.json").read_text())["world_size"] == 2
    train(TrainConfig(**_config(case, tmp_path / "one", 8)), echo=lambda _s: None)
    _same_adapter(out / "adapter", tmp_path / "one" / "adapter")
    _same_adapter(tmp_path / "accelerate" / "adapter", tmp_path / "one" / "adapter")


@pytest.mark.parametrize("method", ["sparse_adapter", "adalora"])
def test_methods_that_cannot_shard_are_refused_up_front(method) -> None:
    with pytest.raises(ShardingError, match=f"{method}.*--strategy fsdp"):
        check_method(method, "fsdp")
    check_method(method, "ddp")


def test_quantized_storage_held_as_parameters_computes_the_same() -> None:
    """What FSDP shards of an NF4 layer: its packed storage as frozen parameters, same outputs."""
    from torch import nn

    from peftkit.quant.linear import QuantLinear
    from peftkit.quant.spec import QuantSpec

    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(128, 64), QuantSpec("nf4", double_quant=True))
    x = torch.randn(3, 128)
    before, storage = layer(x), layer.storage_bytes()
    layer.storage_as_parameters()
    shardable = {name for name, p in layer.named_parameters() if p.dim() > 0 and not p.requires_grad}
    assert {"qweight", "absmax_codes", "absmax_scale"} <= shardable
    assert layer.storage_bytes() == storage
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
