"""Real processes: Ctrl-C writes a resumable checkpoint; 2-process DDP (gloo) equals one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from support import adapter_tensors

from peftkit.train.config import TrainConfig
from peftkit.train.run import train

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PEFTKIT_CACHE=str(tmp / "cache"))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_ctrl_c_writes_resumable_checkpoint(tmp_path, bert_dir, sentiment_csv) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftkit", "train", "--model", str(bert_dir), "--data", str(sentiment_csv),
           "--out", str(out), "--max-steps", "100000", "--batch-size", "4", "--threads", "1", "--no-progress",
           "--no-eval-before", "--save-every", "1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().count("\n") >= 1):  # at least 10 steps done
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] >= 10
    assert not list(out.glob(".*tmp*"))  # no half-written folder left behind
    result = train(TrainConfig(model=str(bert_dir), data=str(sentiment_csv), out=str(out), batch_size=4,
                               max_steps=state["step"] + 2, resume="auto", progress=False), echo=lambda _s: None)
    assert result["steps"] == state["step"] + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path, bert_dir, sentiment_csv) -> None:
    common = ["--model", str(bert_dir), "--data", str(sentiment_csv), "--max-steps", "6", "--lr", "0.01",
              "--seed", "1", "--no-progress", "--method-options", "targets=all-linear"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "peftkit", "train", *common, "--batch-size", "4",
           "--out", str(tmp_path / "ddp"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    single = train(TrainConfig(model=str(bert_dir), data=str(sentiment_csv), max_steps=6, lr=0.01, seed=1,
                               batch_size=8, progress=False, out=str(tmp_path / "one"),
                               method_options={"targets": "all-linear"}), echo=lambda _s: None)
    a, b = adapter_tensors(tmp_path / "ddp" / "adapter"), adapter_tensors(tmp_path / "one" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert lines[0]["metrics"]["accuracy"] == single["metrics"]["accuracy"]
    assert abs(lines[0]["metrics"]["loss"] - single["metrics"]["loss"]) < 1e-4
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2
