"""``kill -9`` at random moments: a fork server and the writers it forks, shared by
tests/test_crash_safety.py and benchmarks/crash_safety.py.

`Server` forks a server process from the caller (which has torch, transformers and peftkit imported
already), and the server forks one writer per command: a fork costs milliseconds where a fresh
interpreter costs seconds, so many kills fit in a test. Writers report on a pipe, one JSON object
per line (a line is one ``write`` shorter than the pipe's atomic size, so a kill never leaves half
of one); the server reports each writer's pid and, once it is reaped, how it ended. Kills go
through a pidfd, so they can only ever reach the writer they name.

Writers (`WRITERS`):

- ``adapter``: saves an adapter again and again, every parameter of save k equal to k, and reports
  ``{"saved": k}`` after each save returns;
- ``checkpoint``: the same with training checkpoints (adapter, optimizer state and step all k);
- ``train``: one `peftkit.train` run, resumed (``resume="auto"``) when a checkpoint exists.

``fallback=True`` makes a writer replace folders without ``renameat2`` (`core.atomic`'s two-rename
path) and widens the moment between the two renames, where a kill leaves the path missing and
readers must find the previous copy aside.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VALUE_SCALE = 1e-3  # save k holds k * VALUE_SCALE everywhere (small, exactly comparable as float32)


# -- the parent's side -------------------------------------------------------------------------------
class Server:
    """The fork server, seen from the test: `start` a writer, `expect` its events, `kill` it."""

    def __init__(self, log: Path) -> None:
        """Fork the server from this process, which has torch, transformers and peftkit imported
        already (a fresh interpreter would spend many seconds importing them)."""
        commands, self._commands = os.pipe()
        self._events_fd, events = os.pipe()
        self._log = log
        self.pid = os.fork()
        if self.pid == 0:  # the server: never returns into the caller
            code = 1
            try:
                os.close(self._commands)
                os.close(self._events_fd)
                os.dup2(commands, 0)
                os.dup2(events, 1)
                os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                serve()
                code = 0
            finally:
                os._exit(code)
        os.close(commands)
        os.close(events)
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._pidfds: dict[int, int] = {}
        self.started_at: dict[int, float] = {}  # pid -> when it was forked (time.monotonic, same clock as events)
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda e: "ready" in e, timeout=120)

    def _read(self) -> None:
        with open(self._events_fd, encoding="utf-8") as lines:
            for line in lines:
                try:
                    self._queue.put(json.loads(line))
                except json.JSONDecodeError:
                    self._queue.put({"garbled": line})
        self._queue.put({"server_exit": True})

    def expect(self, test, timeout: float, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The next event passing `test`; the events before it go to `seen`. Fails on an error."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no event within {timeout} s; see {self._log}") from None
            if "error" in event or "server_exit" in event or "garbled" in event:
                raise RuntimeError(f"writer or server failed: {event}; see {self._log}")
            if test(event):
                return event
            if seen is not None:
                seen.append(event)

    def start(self, writer: str, **args: Any) -> int:
        os.write(self._commands, (json.dumps({"writer": writer, **args}) + "\n").encode())
        event = self.expect(lambda e: "pid" in e, timeout=60)
        pid = event["pid"]
        self.started_at[pid] = event["t"]
        with contextlib.suppress(ProcessLookupError):  # a pidfd names this process even once its pid is reused
            self._pidfds[pid] = os.pidfd_open(pid)
        return pid

    def kill(self, pid: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """SIGKILL writer `pid` unless it has ended, and wait until it is reaped. Returns its exit event
        (``killed``: the signal ended it) and the events it sent before."""
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        seen: list[dict[str, Any]] = []
        return self.expect(lambda e: e.get("exited") == pid, timeout=600, seen=seen), seen

    def wait(self, pid: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait until writer `pid` ends by itself; as `kill` returns."""
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            os.close(fd)
        seen: list[dict[str, Any]] = []
        return self.expect(lambda e: e.get("exited") == pid, timeout=600, seen=seen), seen

    def close(self) -> None:
        os.close(self._commands)  # the server ends when its commands do
        os.waitpid(self.pid, 0)


@dataclass
class Tally:
    """What a series of kills did."""

    kills: int = 0  # writers killed while running
    lost: int = 0  # kills after which the last completed copy was not intact, loadable and current
    missing: int = 0  # kills after which the path itself was missing (its previous copy found aside)
    mid_write: int = 0  # kills that left a temporary file or folder (they landed inside a write)
    runs: int = 0  # training runs completed after kills
    not_identical: int = 0  # of those, runs whose final adapter differs from the uninterrupted run's
    problems: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f) + getattr(other, f) for f in
                       ("kills", "lost", "missing", "mid_write", "runs", "not_identical", "problems")))


def leftovers(path: Path) -> list[str]:
    """Temporary files and folders of `path` in its folder (none when the folder does not exist yet)."""
    if not path.parent.is_dir():
        return []
    return [p.name for p in path.parent.iterdir() if p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-"))]


def adapter_version(path: Path) -> int:
    """The save k of the adapter folder at `path` (loaded as a user would, onto a fresh model)."""
    from models import tiny_llama

    import peftkit

    tuned = peftkit.load(tiny_llama(), path)
    versions = {version_of(tuned.adapter_state(name).values()) for name in tuned.adapters}
    if len(versions) != 1 or None in versions:
        raise AssertionError(f"{path} mixes saves: {versions}")
    return versions.pop()


def checkpoint_version(path: Path) -> int:
    """The save k of the checkpoint at `path`, checked whole and restored into a fresh adapter and optimizer."""
    import random

    import torch

    from peftkit.core.atomic import existing
    from peftkit.train import checkpoint as ckpt

    doc = ckpt.verify(path)
    tuned = tiny_adapter()
    optimizer = tiny_optimizer(tuned)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    try:
        ckpt.restore(existing(path), doc, tuned, "default", optimizer)
    finally:
        torch.set_rng_state(rng)
        random.setstate(py_rng)
    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    version = version_of([*tuned.adapter_state("default").values(), *moments])
    if version != doc["step"]:
        raise AssertionError(f"{path}: step {doc['step']} but tensors of save {version}")
    return version


def kill_saves(server: Server, writer: str, path: Path, kills: int, rng, check, **args: Any) -> Tally:
    """Start `writer` saving to `path` `kills` times; each time let it finish a save, SIGKILL it at a
    random moment within the next two saves' time, and `check` (the save k at `path`) that the path
    holds the last save reported complete or the one in flight, whole."""
    tally, interval = Tally(), None
    for trial in range(kills):
        pid = server.start(writer, path=str(path), start=(trial + 1) * 100_000, **args)
        last = server.expect(lambda e: "saved" in e, timeout=120)  # there is a previous copy to lose
        if interval is None:  # how long one save takes, from the first writer's first two
            second = server.expect(lambda e: "saved" in e, timeout=120)
            interval, last = second["t"] - last["t"], second
        time.sleep(rng.uniform(0, 2 * interval))
        end, seen = server.kill(pid)
        acked = max([last["saved"]] + [e["saved"] for e in seen if "saved" in e])
        tally.kills += end["killed"]
        tally.mid_write += bool(leftovers(path))
        tally.missing += not path.exists()
        try:
            version = check(path)
        except Exception as err:  # noqa: BLE001 - counted and reported
            version, problem = None, f"{type(err).__name__}: {err}"
        else:
            problem = None if version in (acked, acked + 1) else f"holds save {version}, last complete {acked}"
        if problem:
            tally.lost += 1
            tally.problems.append(f"kill {trial + 1}: {problem}")
    return tally


def kill_training(server: Server, config: dict[str, Any], root: Path, reference: dict[str, Any], kills: int, rng,
                  duration: float, fallback: bool = False) -> Tally:
    """Train `config` in runs under `root` until `kills` kills are done: each run is SIGKILLed at a random
    moment within `duration` seconds of each (re)start and resumed, until it completes by itself.
    After each kill the checkpoint must be whole and never behind the one before; each completed
    run's final adapter must be bit-identical to `reference`."""
    tally = Tally()
    while tally.kills < kills:
        tally = tally.add(_killed_run(server, {**config, "out": str(root / f"run{tally.runs}")}, reference, kills - tally.kills,
                                      rng, duration, fallback))
    return tally


def _killed_run(server: Server, config: dict[str, Any], reference: dict[str, Any], kills: int, rng,
                duration: float, fallback: bool) -> Tally:
    import torch
    from support import adapter_tensors

    from peftkit.core.atomic import existing
    from peftkit.train import checkpoint as ckpt

    tally, out, step = Tally(), Path(config["out"]), -1
    while True:
        pid = server.start("train", config=config, fallback=fallback)
        if tally.kills < kills:
            time.sleep(rng.uniform(0, duration))
            end, _ = server.kill(pid)
        else:
            end, _ = server.wait(pid)
        if not end["killed"]:
            if end["code"] != 0:
                raise RuntimeError(f"training ended with {end}")
            break
        tally.kills += 1
        tally.mid_write += bool(leftovers(out / "checkpoint") or leftovers(out / "adapter"))
        tally.missing += step >= 0 and not (out / "checkpoint").exists()
        folder = existing(out / "checkpoint")
        try:
            now = ckpt.verify(folder)["step"] if folder.exists() or step >= 0 else -1
        except Exception as err:  # noqa: BLE001 - counted and reported
            tally.lost += 1
            tally.problems.append(f"{out}, kill {tally.kills}: {type(err).__name__}: {err}")
            return tally
        if now < step:
            tally.lost += 1
            tally.problems.append(f"{out}, kill {tally.kills}: the checkpoint went back from step {step} to {now}")
        step = now
    final = adapter_tensors(out / "adapter")
    tally.runs = 1
    if final.keys() != reference.keys() or not all(torch.equal(final[k], reference[k]) for k in reference):
        tally.not_identical = 1
        tally.problems.append(f"{out}: the final adapter differs from the uninterrupted run's")
    return tally


# -- models the writers and the checks build alike ------------------------------------------------------
def tiny_adapter(adapters: int = 1):
    from models import tiny_llama

    import peftkit

    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", r=4))
    if adapters > 1:
        peftkit.attach(tuned, peftkit.config("lora", r=2, targets=["k_proj"]), name="other")
    return tuned


def fill(tuned, k: int, optimizer=None) -> None:
    """Make every adapter parameter (and optimizer state tensor) of `tuned` save k's."""
    import torch

    with torch.no_grad():
        for name in tuned.adapters:
            for p in tuned.trainable_parameters(name):
                p.fill_(k * VALUE_SCALE)
        for state in optimizer.state.values() if optimizer is not None else ():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.fill_(k * VALUE_SCALE)


def tiny_optimizer(tuned):
    """AdamW over the adapter with its state created (one step on a made-up loss)."""
    import torch

    params = tuned.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def version_of(tensors) -> float | None:
    """The k of a save (every value k * VALUE_SCALE), or None when its values are not all one k."""
    import torch

    values = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    first = float(values[0])
    return round(first / VALUE_SCALE) if bool((values == values[0]).all()) else None


# -- the writers (run in forked children) -------------------------------------------------------------
def _emit(doc: dict[str, Any]) -> None:
    os.write(1, (json.dumps(doc) + "\n").encode())


def _fallback() -> None:
    """Replace folders with two renames, and dwell between them (a kill there leaves the path missing)."""
    import peftkit.core.atomic as atomic

    atomic._exchange = lambda a, b: False
    rename = os.replace

    def slow_replace(src, dst) -> None:
        rename(src, dst)
        if ".old-" in os.fspath(dst):
            time.sleep(0.03)

    os.replace = slow_replace


def write_adapters(args: dict[str, Any], tuned) -> None:
    k = args["start"]
    while True:
        k += 1
        fill(tuned, k)
        tuned.save(args["path"], format=args.get("format", "peftkit"))
        _emit({"saved": k, "t": time.monotonic()})


def write_checkpoints(args: dict[str, Any], prototype) -> None:
    from peftkit.train import checkpoint as ckpt

    tuned, optimizer = prototype
    k = args["start"]
    while True:
        k += 1
        fill(tuned, k, optimizer)
        ckpt.save(Path(args["path"]), tuned, "default", optimizer,
                  {"step": k, "best": None, "bad_evals": 0, "history": [], "elapsed": 0.0, "finished": False})
        _emit({"saved": k, "t": time.monotonic()})


def run_training(args: dict[str, Any], _prototype: None) -> None:
    import dataclasses

    from peftkit.core.atomic import existing
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    cfg = TrainConfig(**args["config"])
    resume = "auto" if (existing(Path(cfg.out) / "checkpoint") / "trainer.json").is_file() else None
    result = train(dataclasses.replace(cfg, resume=resume), echo=lambda _s: None)
    _emit({"done": result["steps"], "resumed": resume is not None, "t": time.monotonic()})


WRITERS = {"adapter": write_adapters, "checkpoint": write_checkpoints, "train": run_training}


def _prototype(command: dict[str, Any]) -> Any:
    """What a writer starts from, built once in the server (a forked writer gets its own copy)."""
    if command["writer"] == "adapter":
        return tiny_adapter(command.get("adapters", 1))
    if command["writer"] == "checkpoint":
        tuned = tiny_adapter()
        return tuned, tiny_optimizer(tuned)
    return None


def serve() -> None:
    """Read commands (JSON lines) on stdin; fork a writer for each, report its pid, reap it, report how
    it ended; events go to stdout as JSON lines."""
    import torch

    torch.set_num_threads(1)
    prototypes: dict[str, Any] = {}
    _emit({"ready": True})
    with open(0, encoding="utf-8") as commands:
        for line in commands:
            command = json.loads(line)
            key = json.dumps([command["writer"], command.get("adapters", 1)])
            if key not in prototypes:
                prototypes[key] = _prototype(command)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    if command.pop("fallback", False):
                        _fallback()
                    WRITERS[command.pop("writer")](command, prototypes[key])
                except BaseException as err:  # noqa: BLE001 - reported to the test, which fails
                    _emit({"error": f"{type(err).__name__}: {err}"})
                    code = 1
                finally:
                    os._exit(code)
            _emit({"pid": pid, "t": time.monotonic()})
            _, status = os.waitpid(pid, 0)
            _emit({"exited": pid, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                   "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "t": time.monotonic()})
