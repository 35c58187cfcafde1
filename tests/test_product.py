"""The product contract: every command and every flag, driven as a user drives them.

- every bad input in tests/product_cases.py exits non-zero with exactly one line on stderr that names
  the input and the fix: no traceback, no silent success, no wait on a terminal, and nothing written
  or overwritten (the suite's folder is compared before and after);
- every flag of every command has help, and a valid form that works (the valid invocations below
  must use every flag the parser has);
- round trips: ``train`` → ``info`` / ``eval`` / ``merge`` / ``generate`` / ``peftkit.load`` on a
  freshly loaded base, for classification (a fresh task head), instruction and lm runs, two seeds,
  both file formats;
- `test_zz_counts` prints the tally: ``pytest tests/test_product.py -q -rP``.

Commands run in-process through `peftkit.cli.main`; a few run as real processes to show that no
traceback reaches a terminal and that ``generate`` does not wait on one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from product_cases import BAD
from support import chat_rows, save_tiny_bert, sentiment_rows, write_csv, write_jsonl

import peftkit
from peftkit import cli
from peftkit.train.config import TrainConfig

TASKS = ("classification", "instruction", "lm")
SEEDS = (1, 2)
FORMATS = ("peftkit", "hf-peft")
OTHER = {"peftkit": "hf-peft", "hf-peft": "peftkit"}


# -- running a command ----------------------------------------------------------------------------
@dataclasses.dataclass
class Ran:
    rc: int
    out: str
    err: str
    escaped: BaseException | None = None
    waited: bool = False  # read a terminal's stdin

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def json(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


class Terminal(io.StringIO):
    """stdin as a terminal nobody types into: reading it would wait forever."""

    def __init__(self) -> None:
        super().__init__()
        self.read_called = False

    def isatty(self) -> bool:
        return True

    def read(self, *args) -> str:
        self.read_called = True
        return ""


def run_cli(argv: list[str], capsys, monkeypatch=None, stdin: io.StringIO | None = None) -> Ran:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    capsys.readouterr()
    escaped, rc = None, None
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        rc = stop.code
    except BaseException as err:  # noqa: BLE001 - a traceback is what the suite looks for
        escaped, rc = err, -1
    captured = capsys.readouterr()
    return Ran(rc, captured.out, captured.err, escaped, bool(getattr(stdin, "read_called", False)))


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# -- the world: tiny models, data files and trained runs --------------------------------------------
def _held_out_free_rows() -> list[dict]:
    """Two classes whose rows all land on the training side of the hash split (no held-out rows)."""
    from peftkit.train.data import Source, _split_rows

    words = ["good", "great", "bad", "awful", "film", "movie", "plot", "story", "scene", "actor"]
    picked = []
    for label in ("0", "1"):
        for word in words:
            rec = {"text": f"{word} {label}", "label": label}
            if not _split_rows(Source("x", None, [rec], {}, None), 0.1)[1]:
                picked.append(rec)
                break
    return picked * 4


def _readonly(root: Path) -> Path | None:
    """A folder this process cannot write in: a chmod 555 one, or (as root) a read-only file system."""
    folder = root / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder, Path("/sys/kernel")]
    for place in candidates:
        try:
            probe = place / ".peftkit-probe"
            probe.mkdir()
            probe.rmdir()
        except OSError:
            return place
    return None


def _train_argv(task: str, seed: int, fmt: str, world: dict) -> list[str]:
    data = {"classification": ["--model", world["enc"], "--data", world["sent"], "--lr", "0.01", "--batch-size", "8"],
            "instruction": ["--model", world["llama"], "--data", world["chat"], "--lr", "0.02", "--batch-size", "8"],
            "lm": ["--model", world["llama"], "--data", world["book"], "--max-length", "16", "--batch-size", "4"]}
    return ["train", *data[task], "--task", task, "--max-steps", "3", "--seed", str(seed), "--format", fmt,
            "--out", str(Path(world["runs"]) / f"{task}-{seed}"), "--no-progress", "--json"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, bert_dir, llama_dir) -> dict:
    """Paths by name (the table's placeholders), and the round-trip runs trained once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("product")
    w: dict = {"root": root, "bert": bert_dir, "llama": llama_dir, "new": root / "new-out",
               "missing": root / "nowhere", "runs": root / "runs"}
    w["enc"] = save_tiny_bert(root / "encoder", head=False)  # the classifier is created fresh, from --seed
    w["sent"] = write_csv(root / "sentiment.csv", sentiment_rows(48))
    w["chat"] = write_jsonl(root / "chat.jsonl", chat_rows(24))
    (root / "book.txt").write_text(" ".join(["the movie was very good . the plot is not bad ."] * 30))
    w["book"] = root / "book.txt"
    w["file"] = root / "notes.xyz"
    w["file"].write_text("not a folder")
    w["empty_dir"] = root / "empty"
    w["empty_dir"].mkdir()
    w["three"] = write_csv(root / "three.csv", [{"text": r["text"], "label": i % 3} for i, r in
                                                enumerate(sentiment_rows(24))])
    w["one_class"] = write_csv(root / "one.csv", [{"text": r["text"], "label": "pos"} for r in sentiment_rows(20)])
    w["many_classes"] = write_csv(root / "many.csv", [{"text": "good movie", "label": f"class-{i:03d}"}
                                                      for i in range(500)])
    w["all_empty"] = write_csv(root / "blank.csv", [{"text": " ", "label": i % 2} for i in range(10)])
    w["some_empty"] = write_csv(root / "some-blank.csv", [{"text": "" if i % 4 == 0 else r["text"], "label": r["label"]}
                                                          for i, r in enumerate(sentiment_rows(48))])
    w["tiny"] = write_csv(root / "tiny.csv", _held_out_free_rows())
    w["cats"] = write_csv(root / "cats.csv", [{"text": r["text"], "label": "pos" if r["label"] else "neg"}
                                              for r in sentiment_rows(16)])
    w["cats_eval"] = write_csv(root / "cats-eval.csv", [{"text": "good", "label": "meh"}])
    w["latin1"] = root / "latin1.csv"
    w["latin1"].write_bytes("text,label\nun film tr\xe8s bon,1\n".encode("latin-1"))
    w["bad_yaml"] = root / "bad.yaml"
    w["bad_yaml"].write_text("lr: 0.1\nepochs: [1\n")
    w["alias_yaml"] = root / "alias.yaml"
    w["alias_yaml"].write_text("learning_rate: 0.1\n")
    w["null_yaml"] = root / "null.yaml"
    w["null_yaml"].write_text("eval_fraction: null\n")
    w["date_yaml"] = root / "date.yaml"
    w["date_yaml"].write_text("epochs: 2001-13-45\n")  # YAML reads a date, and refuses month 13
    w["readonly"] = _readonly(root)
    w["results"] = {}
    for task in TASKS:
        for seed in SEEDS:
            fmt = FORMATS[seed % 2 == 0]  # seed 1 trains in peftkit's format, seed 2 in PEFT's
            buf_out, buf_err = io.StringIO(), io.StringIO()
            import contextlib

            with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                rc = cli.main([str(a) for a in _train_argv(task, seed, fmt, w)])
            assert rc == 0, buf_err.getvalue()
            run_dir = w["runs"] / f"{task}-{seed}"
            w["results"][(task, seed)] = json.loads(buf_out.getvalue().strip().splitlines()[-1])
            # the same adapter in the other format, next to it (so run.json is found for both)
            tuned = peftkit.load(_fresh_base(task, w, seed=99), run_dir / "adapter")
            tuned.save(str(run_dir / f"adapter-{OTHER[fmt]}"), format=OTHER[fmt])
    cls_run = w["runs"] / "classification-1"
    w.update(cls_run=cls_run, cls=cls_run / "adapter", cls_hf=cls_run / "adapter-hf-peft",
             chat_run=w["runs"] / "instruction-1", chat_adapter=w["runs"] / "instruction-1" / "adapter")
    w["hf_alone"] = root / "hf-alone"
    shutil.copytree(w["cls_hf"], w["hf_alone"])
    w["truncated"] = root / "truncated"
    shutil.copytree(w["cls"], w["truncated"])
    weights = w["truncated"] / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    w["truncated_hf"] = root / "truncated-hf"
    shutil.copytree(w["cls_hf"], w["truncated_hf"])
    weights = w["truncated_hf"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    w["garbage"] = root / "garbage"
    shutil.copytree(w["cls"], w["garbage"])
    (w["garbage"] / "adapter.json").write_text("{not json")
    w["unfinished"] = root / "unfinished"
    shutil.copytree(cls_run, w["unfinished"])
    state_file = w["unfinished"] / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    state.update(finished=False, step=1, total_steps=3, version=1)  # version 1: no checksum over the edit
    state.pop("sha256", None)
    state_file.write_text(json.dumps(state))
    (root / "cwd").mkdir()
    return w


def _fresh_base(task: str, world: dict, seed: int) -> torch.nn.Module:
    """The base as a user loads it, under a seed other than training's: a new task head differs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classification":
        return AutoModelForSequenceClassification.from_pretrained(world["enc"], num_labels=2)
    return AutoModelForCausalLM.from_pretrained(world["llama"])


@pytest.fixture(scope="module")
def tally() -> dict:
    return {"bad": {}, "round": {}}


def _fill(argv: list[str], world: dict) -> list[str]:
    names = {k: str(v) for k, v in world.items() if isinstance(v, str | Path)}
    return [a.format(**names) for a in argv]


# -- bad inputs ------------------------------------------------------------------------------------
def _verdict(ran: Ran, match: str, before: dict, after: dict) -> str:
    if ran.waited:
        return "hang"
    if ran.escaped is not None or "Traceback" in ran.err:
        return "traceback"
    if ran.rc == 0:
        return "silent"
    lines = ran.err_lines
    if len(lines) != 1 or not lines[0].startswith("peftkit: error: ") or "a peftkit bug" in lines[0]:
        return "unclear"
    if not re.search(match, lines[0]):
        return "unclear"
    if before != after:
        return "wrote"
    return "clean"


@pytest.mark.parametrize("argv, match, options", BAD)
def test_bad_input_is_one_clean_line(argv, match, options, world, tally, capsys, monkeypatch, request) -> None:
    if options.get("needs") == "readonly" and world["readonly"] is None:
        pytest.skip("no folder here refuses writes to this process")
    monkeypatch.chdir(world["root"] / "cwd")
    filled = _fill(argv, world)
    before = snapshot(world["root"])
    ran = run_cli(filled, capsys, monkeypatch, Terminal() if options.get("tty") else None)
    verdict = _verdict(ran, match, before, snapshot(world["root"]))
    tally["bad"][request.node.callspec.id] = verdict
    assert verdict == "clean", f"{verdict}: rc={ran.rc} stderr={ran.err!r} escaped={ran.escaped!r}"
    assert ran.rc in (1, 2)


JSON_ROWS = ["train out is a file", "train warmup negative", "train flag misspelt", "eval adapter is a run folder",
             "info of a truncated hf adapter"]


@pytest.mark.parametrize("name", JSON_ROWS)
def test_json_errors_are_the_last_stdout_line(name, world, capsys, monkeypatch) -> None:
    argv, match, _ = next(p.values for p in BAD if p.id == name)
    monkeypatch.chdir(world["root"] / "cwd")
    ran = run_cli([*_fill(argv, world), "--json"], capsys)
    assert ran.rc in (1, 2) and len(ran.err_lines) == 1
    error = ran.json()["error"]
    assert error["type"] and re.search(match, error["message"])
    assert ran.err_lines[0] == f"peftkit: error: {error['message']}"


def test_an_unforeseen_failure_is_still_one_line(capsys, monkeypatch) -> None:
    """What no check foresaw (a bug, a disk that fills up) is one line too; PEFTKIT_DEBUG=1 shows the traceback."""
    from peftkit.cli import methods

    def broken(_args):
        raise RuntimeError("boom\nsecond line")

    def disk_full(_args):
        raise OSError(28, "No space left on device", "/runs/x/adapter.safetensors")

    monkeypatch.setattr(methods, "run", broken)
    ran = run_cli(["methods", "--json"], capsys)
    assert ran.rc == 1 and ran.err_lines == ["peftkit: error: RuntimeError: boom second line — a peftkit bug: please "
                                             "report it with the command (PEFTKIT_DEBUG=1 shows the traceback)."]
    assert ran.json()["error"]["type"] == "RuntimeError"
    monkeypatch.setattr(methods, "run", disk_full)
    ran = run_cli(["methods"], capsys)
    assert ran.rc == 1 and len(ran.err_lines) == 1 and "No space left on device (/runs/x/adapter.safetensors)" in ran.err
    monkeypatch.setenv("PEFTKIT_DEBUG", "1")
    monkeypatch.setattr(methods, "run", broken)
    assert isinstance(run_cli(["methods"], capsys).escaped, RuntimeError)


def _python() -> list[str]:
    return [sys.executable, "-m", "peftkit"]


def _env(world: dict) -> dict:
    src = str(Path(peftkit.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PEFTKIT_CACHE": str(world["root"] / "cache"), "HF_HUB_OFFLINE": "1"}


def test_no_traceback_or_wait_reaches_a_terminal(world, tally) -> None:
    """Real processes: a bad flag, a damaged adapter, and `generate` with a terminal on stdin."""
    import pty

    before = snapshot(world["runs"])
    for argv, match in [(["info", str(world["truncated_hf"])], "adapter_model.safetensors is not a valid")]:
        done = subprocess.run(_python() + argv, capture_output=True, text=True, env=_env(world), timeout=120,
                              stdin=subprocess.DEVNULL)
        lines = done.stderr.strip().splitlines()
        tally["bad"][f"process: {argv[0]} {match}"] = "clean" if done.returncode == 1 and len(lines) == 1 else "bad"
        assert done.returncode == 1 and len(lines) == 1 and match in lines[0], done.stderr
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(_python() + ["generate", "--model", str(world["llama"])], stdin=follower,
                              capture_output=True, text=True, env=_env(world), timeout=120)
    except subprocess.TimeoutExpired:
        tally["bad"]["process: generate on a terminal"] = "hang"
        raise
    finally:
        os.close(leader)
        os.close(follower)
    tally["bad"]["process: generate on a terminal"] = "clean" if done.returncode == 1 else "bad"
    assert done.returncode == 1 and "no prompt: pass --prompt" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(world["runs"]) == before


# -- help and valid forms ----------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return cli.build_parser().commands


def test_every_setting_is_a_flag_with_help() -> None:
    train = _subparsers()["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in flags, field.name
        assert field.metadata.get("help", "").strip(), field.name


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "info", "methods", "bench"])
def test_every_option_has_help(command) -> None:
    for action in _subparsers()[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), action.dest


def _flags_of(command: str) -> set[str]:
    return {s for a in _subparsers()[command]._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def _used(invocations: list[list[str]]) -> set[str]:
    return {a.split("=")[0] for argv in invocations for a in argv if a.startswith("--")}


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def test_train_flags_valid_forms(world, capsys, monkeypatch, tmp_path) -> None:
    """Every train flag, given a valid value, is taken as given (shown by --print-config)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("weight_decay: 0.01\n")
    enc, sent = str(Path(world["enc"]).resolve()), str(Path(world["sent"]).resolve())
    on = {"--model": enc, "--task": "classification", "--data": sent, "--eval-data": sent,
          "--eval-fraction": 0.2, "--text-field": "text", "--label-field": "label", "--prompt-field": "prompt",
          "--response-field": "response", "--method": "lora", "--method-options": "r=4",
          "--quantize": "int8", "--optimizer": "adamw", "--lr": 0.01, "--head-lr": 0.02, "--base-dropout": 0.1,
          "--weight-decay": 0.02, "--schedule": "cosine", "--warmup": 2.0, "--max-grad-norm": 0.5,
          "--batch-size": 4, "--grad-accum": 2, "--max-length": 32, "--epochs": 2.0, "--max-steps": 7,
          "--eval-every": 3, "--eval-batch-size": 16, "--max-eval-examples": 5, "--save-every": 3,
          "--early-stopping": 2, "--metric": "macro_f1", "--seed": 3, "--out": str(tmp_path / "o"),
          "--format": "hf-peft", "--threads": 1, "--num-labels": 3, "--calibration-batches": 2, "--precision": "fp32",
          "--strategy": "ddp"}
    switches = ["--probe-head", "--load-best", "--overwrite", "--eval-before", "--gradient-checkpointing",
                "--no-group-by-length", "--no-progress", "--no-chunked-loss", "--no-fast-dropout",
                "--no-rebuild-inputs"] + (["--tensorboard"] if _tensorboard_installed() else [])
    argv = ["train", "--config", "job.yaml", "--print-config", "--json"]
    for flag, value in on.items():
        argv += [flag, str(value)]
    ran = run_cli(argv + switches, capsys)
    assert ran.rc == 0, ran.err
    shown = yaml.safe_load(ran.out.rsplit("\n", 2)[0])
    assert ran.json()["config"] == shown
    for flag, value in on.items():
        key = flag[2:].replace("-", "_")
        expected = {"r": 4, "targets": "all-linear"} if key == "method_options" else value
        assert shown[key] == expected, key
    for switch in switches:
        key = switch.removeprefix("--no-").removeprefix("--").replace("-", "_")
        assert shown[key] is (not switch.startswith("--no-")), key
    off = ["--no-probe-head", "--no-load-best", "--no-overwrite", "--no-eval-before", "--no-gradient-checkpointing",
           "--group-by-length", "--progress", "--no-tensorboard", "--chunked-loss", "--fast-dropout", "--rebuild-inputs"]
    resumed = ["train", "--resume", str(world["cls_run"]), "--print-config"]
    ran = run_cli(resumed + off, capsys)
    assert ran.rc == 0, ran.err
    shown = yaml.safe_load(ran.out)
    assert shown["out"] == str(world["cls_run"]) and shown["seed"] == 1 and shown["model"] == str(world["enc"])
    assert all(shown[s.removeprefix("--no-").removeprefix("--").replace("-", "_")] is not s.startswith("--no-")
               for s in off)
    ran = run_cli(["train", "--resume", "--out", str(world["cls_run"]), "--print-config"], capsys)
    assert ran.rc == 0 and yaml.safe_load(ran.out)["seed"] == 1, ran.err
    exempt = set() if _tensorboard_installed() else {"--tensorboard"}  # the package is not installed here
    assert _flags_of("train") - exempt - _used([argv + switches, resumed + off]) == set()


def test_eval_generate_merge_info_methods_flags_valid_forms(world, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    cls, chat = str(world["cls"]), str(world["chat_adapter"])
    invocations = {
        "eval": [["eval", "--adapter", cls, "--json", "--no-progress", "--max-eval-examples", "3", "--batch-size", "2",
                  "--max-length", "32"],
                 ["eval", "--adapter", cls, "--model", str(world["enc"]), "--no-check-base", "--data",
                  str(world["sent"]), "--task", "classification", "--text-field", "text", "--label-field", "label",
                  "--progress"],
                 ["eval", "--adapter", cls, "--check-base", "--eval-data", str(world["sent"]), "--no-progress"],
                 ["eval", "--adapter", chat, "--prompt-field", "prompt", "--response-field", "response",
                  "--no-progress"]],
        "generate": [["generate", "--adapter", chat, "--prompt", "hi", "--prompt", "hello", "--max-new-tokens", "2",
                      "--temperature", "0.7", "--json", "--check-base"],
                     ["generate", "--model", str(world["llama"]), "--prompt", "hi", "--no-chat-template",
                      "--no-check-base", "--max-new-tokens", "2"]],
        "merge": [["merge", "--adapter", chat, "--model", str(world["llama"]), "--no-check-base", "--out",
                   str(tmp_path / "m1"), "--json"],
                  ["merge", "--adapter", cls, "--check-base", "--out", str(tmp_path / "m2")]],
        "info": [["info", cls, "--json"], ["info", str(world["cls_hf"])]],
        "methods": [["methods", "--json"], ["methods"]],
    }
    for command, runs in invocations.items():
        for argv in runs:
            ran = run_cli(argv, capsys)
            assert ran.rc == 0, (argv, ran.err)
            assert not [line for line in ran.err_lines if "error" in line or "warning" in line], ran.err
            if "--json" in argv:
                assert isinstance(ran.json(), dict)
        assert _flags_of(command) - _used(runs) == set(), command
    piped = run_cli(["generate", "--model", str(world["llama"]), "--max-new-tokens", "2"], capsys, monkeypatch,
                    io.StringIO("hello\n\nhi\n"))
    assert piped.rc == 0 and piped.out.count(">>> ") == 2
    version = run_cli(["--version"], capsys)
    assert version.rc == 0 and version.out.strip() == f"peftkit {peftkit.version.__version__}"


# -- what used to go wrong quietly, now handled with a word ------------------------------------------
def test_empty_texts_are_dropped_with_one_warning(world, capsys, tmp_path) -> None:
    ran = run_cli(["train", "--model", world["bert"], "--data", world["some_empty"], "--out", tmp_path / "r",
                   "--max-steps", "1", "--batch-size", "8", "--no-progress", "--json"], capsys)
    assert ran.rc == 0, ran.err
    assert ran.err_lines == [line for line in ran.err_lines if line.startswith("peftkit: warning: ")]
    assert any(re.search(r"dropped \d+ of \d+ training rows .* empty 'text'", line) for line in ran.err_lines)
    assert ran.json()["notes"]


def test_overwrite_replaces_a_finished_run(world, capsys, tmp_path) -> None:
    out = tmp_path / "r"
    base = ["train", "--model", world["bert"], "--data", world["sent"], "--out", out, "--max-steps", "2",
            "--batch-size", "8", "--no-progress"]
    assert run_cli([*base, "--eval-every", "1"], capsys).rc == 0
    assert (out / "best").is_dir()
    ran = run_cli([*base, "--overwrite", "--seed", "5"], capsys)
    assert ran.rc == 0, ran.err
    assert not (out / "best").exists()  # the old run's best adapter is not left to be mistaken for this one's
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 5


def test_resume_forms_continue_the_run_in_its_folder(world, capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert run_cli(["train", "--model", world["bert"], "--data", world["sent"], "--out", "runs/r", "--max-steps", "2",
                    "--batch-size", "8", "--no-progress", "--seed", "4"], capsys).rc == 0
    run_dir = tmp_path / "a" / "runs" / "r"
    monkeypatch.chdir(tmp_path / "b")  # elsewhere: the run's settings and folder come from the run
    for step, resume in [(3, [str(run_dir)]), (4, [str(run_dir / "checkpoint")])]:
        ran = run_cli(["train", "--resume", *resume, "--max-steps", str(step), "--no-progress", "--json"], capsys)
        assert ran.rc == 0, ran.err
        assert ran.json()["steps"] == step and Path(ran.json()["out"]) == run_dir
    assert list((tmp_path / "b").iterdir()) == []  # no stray runs/.../run.json
    monkeypatch.chdir(tmp_path / "a")
    ran = run_cli(["train", "--resume", "--out", "runs/r", "--max-steps", "5", "--no-progress", "--json"], capsys)
    assert ran.rc == 0 and ran.json()["steps"] == 5, ran.err
    assert json.loads((run_dir / "run.json").read_text())["config"]["seed"] == 4
    assert sorted(p.name for p in (tmp_path / "a" / "runs").iterdir()) == ["r"]


def test_eval_runs_from_anywhere_and_old_relative_paths_are_anchored(world, capsys, monkeypatch, tmp_path) -> None:
    run_dir = tmp_path / "proj" / "runs" / "x"
    shutil.copytree(world["cls_run"], run_dir)
    shutil.copy(world["sent"], tmp_path / "proj" / "data.csv")
    shutil.copytree(world["enc"], tmp_path / "proj" / "enc")
    doc = json.loads((run_dir / "run.json").read_text())
    doc["config"].update(model="enc", data="data.csv", out="runs/x")  # as runs before absolute paths wrote it
    doc["model_path"] = "enc"
    (run_dir / "run.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    ran = run_cli(["eval", "--adapter", run_dir / "adapter", "--json", "--no-progress"], capsys)
    assert ran.rc == 0, ran.err
    assert ran.json()["metrics"]["accuracy"] == pytest.approx(world["results"][("classification", 1)]["metrics"]
                                                              ["accuracy"])


def test_eval_progress_and_a_fixed_sample(world, capsys) -> None:
    shown = run_cli(["eval", "--adapter", world["cls"]], capsys)
    assert shown.rc == 0 and "eval" in shown.err and "error" not in shown.err
    first = run_cli(["eval", "--adapter", world["cls"], "--max-eval-examples", "2", "--json", "--no-progress"], capsys)
    again = run_cli(["eval", "--adapter", world["cls"], "--max-eval-examples", "2", "--json", "--no-progress"], capsys)
    assert first.err == "" and first.json()["data"]["eval_examples"] == 2
    assert first.json()["data"]["eval_digest"] == again.json()["data"]["eval_digest"]
    assert first.json()["metrics"] == again.json()["metrics"]


def test_method_configs_never_raise_type_errors() -> None:
    """Every option of every registered method, given None, a word or a list: a ConfigError naming it or
    a valid config, never a TypeError from comparing the wrong type."""
    from cases import VARIANTS

    from peftkit.core import registry
    from peftkit.errors import ConfigError

    tried = 0
    for spec in registry.specs():
        base = VARIANTS.get(spec.name, [{}])[0]
        for option in spec.config_cls.option_names():
            for value in (None, "word", [None], {"a": None}):
                tried += 1
                try:
                    peftkit.config(spec.name, **{**base, option: value})
                except ConfigError as err:
                    assert option in str(err), (spec.name, option, value, str(err))
    assert tried > 100


# -- round trips ---------------------------------------------------------------------------------------
def _logits(model: torch.nn.Module, task: str) -> torch.Tensor:
    ids = torch.tensor([[7, 12, 20, 15, 9, 30], [8, 10, 11, 25, 13, 14]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", TASKS)
def test_round_trip(task, seed, fmt, world, tally, capsys, tmp_path, request) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tally["round"][request.node.callspec.id] = "failed"
    run_dir = world["runs"] / f"{task}-{seed}"
    trained_as = FORMATS[seed % 2 == 0]
    adapter = run_dir / ("adapter" if fmt == trained_as else f"adapter-{fmt}")
    result = world["results"][(task, seed)]
    info = run_cli(["info", adapter, "--json"], capsys)
    assert info.rc == 0 and info.json()["format"] == fmt and info.json()["method"] in ("lora", "LORA")
    evaluated = run_cli(["eval", "--adapter", adapter, "--json", "--no-progress"], capsys)
    assert evaluated.rc == 0, evaluated.err
    for key, value in result["metrics"].items():
        assert evaluated.json()["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    merged_dir = tmp_path / "merged"
    merged = run_cli(["merge", "--adapter", adapter, "--out", merged_dir, "--json"], capsys)
    assert merged.rc == 0, merged.err
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    plain = auto.from_pretrained(merged_dir).eval()
    loaded = peftkit.load(_fresh_base(task, world, seed=seed + 100), adapter).eval()  # another fresh head
    torch.testing.assert_close(_logits(plain, task), _logits(loaded, task), atol=1e-4, rtol=1e-4)
    if task != "classification":
        said = run_cli(["generate", "--adapter", adapter, "--prompt", "hello", "--max-new-tokens", "4", "--json"],
                       capsys)
        assert said.rc == 0, said.err
        from peftkit.train.data import format_prompt
        from peftkit.train.models import tokenizer

        tok = tokenizer(str(world["llama"]))
        enc = tok(format_prompt(tok, "hello"), return_tensors="pt", add_special_tokens=False)
        ids = plain.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert said.json()["generations"][0]["response"] == expected
    tally["round"][request.node.callspec.id] = "ok"


def test_zz_counts(tally) -> None:
    """The tally of this module's run (`pytest tests/test_product.py -q -rP` shows it)."""
    bad = tally["bad"]
    counts = {kind: sum(v == kind for v in bad.values()) for kind in ("clean", "traceback", "silent", "hang",
                                                                       "unclear", "wrote")}
    rounds = tally["round"]
    print(f"bad inputs tried: {len(bad)} (table {len(BAD)} rows, in-process; plus real processes) / clean one-line "
          f"errors: {counts['clean']} / tracebacks: {counts['traceback']} / silent: {counts['silent']} / hangs: "
          f"{counts['hang']} / unclear: {counts['unclear']} / wrote files: {counts['wrote']}")
    print(f"round trips tried: {len(rounds)} / failed: {sum(v != 'ok' for v in rounds.values())}")
    assert counts["traceback"] == counts["silent"] == counts["hang"] == counts["unclear"] == counts["wrote"] == 0
    assert all(v == "ok" for v in rounds.values())
