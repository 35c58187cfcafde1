"""``kill -9`` while saving loses nothing (tests/crash_harness.py forks the writers and kills them at
seeded random moments): after every kill the adapter or checkpoint at the path is the last complete
save (or the one in flight), whole and loadable; the next successful write deletes what the killed
writers left; and a training run killed at random moments and resumed ends with the uninterrupted
run's adapter, bit for bit. Larger counts: ``python benchmarks/crash_safety.py``."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from crash_harness import (
    Server,
    Tally,
    adapter_version,
    checkpoint_version,
    fill,
    kill_saves,
    kill_training,
    leftovers,
    tiny_adapter,
    tiny_optimizer,
)
from support import adapter_tensors

from peftkit.core import atomic
from peftkit.train import checkpoint as ckpt

SEED = 17
# (format, adapters in the folder, two-rename fallback, kills): 20 kills each, 14 with renameat2 and 6 without
ADAPTER_SERIES = [("peftkit", 1, False, 6), ("hf-peft", 1, False, 4), ("peftkit", 2, False, 4), ("peftkit", 1, True, 6)]
CHECKPOINT_SERIES = [(False, 14), (True, 6)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("crash") / "server.log")
    yield server
    server.close()


def test_adapter_saves_survive_kill_9(server, tmp_path) -> None:
    rng, total = random.Random(SEED), Tally()
    for fmt, adapters, fallback, kills in ADAPTER_SERIES:
        path = tmp_path / f"{fmt}-{adapters}-{'fallback' if fallback else 'exchange'}" / "adapter"
        tally = kill_saves(server, "adapter", path, kills, rng, adapter_version, format=fmt, adapters=adapters,
                           fallback=fallback)
        assert fallback or tally.missing == 0  # with renameat2 the path is never missing, not even for a moment
        total = total.add(tally)
        fill(saved := tiny_adapter(adapters), 7)
        saved.save(path, format=fmt)  # the next successful write deletes the killed writers' leftovers
        assert not leftovers(path) and adapter_version(path) == 7
    assert total.kills == sum(s[-1] for s in ADAPTER_SERIES) and total.lost == 0, total.problems
    assert total.mid_write > 0  # some kills landed inside a save


def test_checkpoint_saves_survive_kill_9(server, tmp_path) -> None:
    rng, total = random.Random(SEED + 1), Tally()
    for fallback, kills in CHECKPOINT_SERIES:
        path = tmp_path / ("fallback" if fallback else "exchange") / "checkpoint"
        tally = kill_saves(server, "checkpoint", path, kills, rng, checkpoint_version, fallback=fallback)
        assert fallback or tally.missing == 0
        total = total.add(tally)
        tuned = tiny_adapter()
        optimizer = tiny_optimizer(tuned)
        fill(tuned, 7, optimizer)
        ckpt.save(path, tuned, "default", optimizer, {"step": 7})
        assert not leftovers(path) and checkpoint_version(path) == 7
    assert total.kills == sum(k for _, k in CHECKPOINT_SERIES) and total.lost == 0, total.problems
    assert total.mid_write > 0


def test_killed_training_resumes_bit_identical(server, tmp_path, bert_dir, sentiment_csv) -> None:
    config = dict(model=str(bert_dir), data=str(sentiment_csv), batch_size=4, grad_accum=2, max_steps=12, lr=5e-3,
                  save_every=2, eval_every=4, method_options={"dropout": 0.1, "r": 4}, progress=False,
                  eval_fraction=0.25, seed=1)
    pid = server.start("train", config={**config, "out": str(tmp_path / "uninterrupted")})
    done = server.expect(lambda e: "done" in e, timeout=600)
    end, _ = server.wait(pid)
    assert end["code"] == 0 and done["done"] == 12
    reference = adapter_tensors(tmp_path / "uninterrupted" / "adapter")
    rng, total = random.Random(SEED + 2), Tally()
    for fallback in (False, True):
        total = total.add(kill_training(server, config, tmp_path / ("fallback" if fallback else "exchange"), reference,
                                        kills=2, rng=rng, duration=done["t"] - server.started_at[pid],
                                        fallback=fallback))
    assert total.kills == 4 and total.runs >= 2, total
    assert total.lost == 0 and total.not_identical == 0, total.problems


# -- the two-rename fallback, step by step: the state a kill between the renames leaves ---------------------
def _killed_between_renames(path: Path) -> Path:
    """Move `path` aside as the fallback's first rename does, under a writer that is no longer running."""
    aside = path.parent / f".{path.name}.old-{_dead_pid()}-1"
    os.rename(path, aside)
    return aside


def _dead_pid() -> int:
    pid = 2 ** 22 - 1  # above the kernel's default pid range; checked to be unused
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_missing_adapter_is_read_from_its_copy_aside_and_the_next_save_cleans_up(tmp_path) -> None:
    path = tmp_path / "adapter"
    fill(tuned := tiny_adapter(), 3)
    tuned.save(path)
    aside = _killed_between_renames(path)
    assert not path.exists() and adapter_version(path) == 3  # peftkit.load finds the complete copy
    fill(tuned, 4)
    tuned.save(path)
    assert adapter_version(path) == 4 and not aside.exists() and not leftovers(path)


def test_a_missing_checkpoint_is_resumed_from_its_copy_aside(tmp_path) -> None:
    path = tmp_path / "checkpoint"
    tuned = tiny_adapter()
    optimizer = tiny_optimizer(tuned)
    fill(tuned, 5, optimizer)
    ckpt.save(path, tuned, "default", optimizer, {"step": 5})
    _killed_between_renames(path)
    assert not path.exists() and checkpoint_version(path) == 5 and ckpt.read(path)["step"] == 5


def test_folders_are_swapped_in_one_step_here(tmp_path, monkeypatch) -> None:
    """On this machine (Linux) the folder swap is renameat2(RENAME_EXCHANGE): no moment without the path."""
    results = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: results.append(real(a, b)) or results[-1])
    tuned = tiny_adapter()
    tuned.save(tmp_path / "a")
    tuned.save(tmp_path / "a")
    assert results == [True]  # the first save had nothing to swap with


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch) -> None:
    path = tmp_path / "adapter"
    fill(tuned := tiny_adapter(), 1)
    tuned.save(path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real, failed = os.replace, []

    def failing(src, dst):
        if Path(dst) == path.resolve() and not failed:  # the new folder into place; putting the old back works
            failed.append(src)
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    fill(tuned, 2)
    with pytest.raises(OSError, match="disk gone"):
        tuned.save(path)
    monkeypatch.undo()
    assert adapter_version(path) == 1 and not leftovers(path)


def test_leftovers_of_a_running_writer_are_kept(tmp_path) -> None:
    """Only dead writers' temporary files are deleted: another process still writing keeps its own."""
    path = tmp_path / "adapter"
    tiny_adapter().save(path)
    mine = tmp_path / f".adapter.tmp-{os.getppid()}-x"  # a live process (the test's parent)
    dead = tmp_path / f".adapter.tmp-{_dead_pid()}-x"
    mine.mkdir()
    dead.mkdir()
    (tmp_path / "unrelated.json").write_text(json.dumps({}))
    tiny_adapter().save(path)
    assert mine.exists() and not dead.exists() and (tmp_path / "unrelated.json").exists()
    shutil.rmtree(mine)


def test_the_harness_tells_saves_apart() -> None:
    """The check after each kill is not vacuous: tensors of two saves are told apart."""
    from crash_harness import version_of

    assert version_of([torch.full((2,), 0.005), torch.full((3,), 0.005)]) == 5
    assert version_of([torch.full((2,), 0.005), torch.full((3,), 0.006)]) is None
