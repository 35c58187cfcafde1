"""The mistakes users make with the library API, one row each: the error type, a message that says
what was wrong and how to fix it, and a model left exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import tiny_bert, tiny_llama

import peftkit


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_llama_adapter(folder: Path) -> Path:
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", r=2))
    tuned.save(folder)
    return folder


def truncate(folder: Path) -> Path:
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    return folder


def attach_twice() -> None:
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora"), name="a")
    peftkit.attach(tuned, peftkit.config("lora"), name="a")


def activate_missing() -> None:
    peftkit.attach(tiny_llama(), peftkit.config("lora"), name="a").activate("b")


MISTAKES: list[tuple[str, type[Exception], str, Callable[[torch.nn.Module, Path], object]]] = [
    ("typo in a target name", peftkit.errors.TargetError, "q_proj",
     lambda m, _: peftkit.attach(m, peftkit.config("lora", targets=["q_prj"]))),
    ("regex that matches nothing", peftkit.errors.TargetError, "matches no module",
     lambda m, _: peftkit.attach(m, peftkit.config("lora", targets=["re:.*query_proj"]))),
    ("layer index past the last block", peftkit.PeftkitError, "layer",
     lambda m, _: peftkit.attach(m, peftkit.config("lora", layers=[7]))),
    ("rank 0", peftkit.errors.ConfigError, "r must be a positive integer",
     lambda m, _: peftkit.config("lora", r=0)),
    ("negative dropout", peftkit.errors.ConfigError, "dropout",
     lambda m, _: peftkit.config("lora", dropout=-0.1)),
    ("alpha of zero", peftkit.errors.ConfigError, "alpha",
     lambda m, _: peftkit.config("lora", alpha=0)),
    ("rank given as text", peftkit.errors.ConfigError, "r must be a positive integer",
     lambda m, _: peftkit.config("lora", r="8")),
    ("unknown method", peftkit.errors.ConfigError, "Did you mean: lora",
     lambda m, _: peftkit.config("lorra")),
    ("unknown option", peftkit.errors.ConfigError, "Did you mean: dropout",
     lambda m, _: peftkit.config("lora", droput=0.1)),
    ("sparsity of 1 removes everything", peftkit.errors.ConfigError, "sparsity",
     lambda m, _: peftkit.config("sparse_adapter", sparsity=1.0)),
    ("adapter name already in use", peftkit.errors.AdapterStateError, "already exists",
     lambda m, _: attach_twice()),
    ("activating an adapter that does not exist", peftkit.errors.AdapterStateError, "no adapter named 'b'",
     lambda m, _: activate_missing()),
    ("loading onto the wrong model", peftkit.errors.AdapterFileError, "does not fit this model",
     lambda m, tmp: peftkit.load(tiny_bert(), saved_llama_adapter(tmp / "a"))),
    ("a truncated weights file", peftkit.errors.AdapterFileError, "truncated",
     lambda m, tmp: peftkit.load(m, truncate(saved_llama_adapter(tmp / "a")))),
    ("a folder that does not exist", peftkit.errors.AdapterFileError, "does not exist",
     lambda m, tmp: peftkit.load(m, tmp / "nowhere")),
    ("a folder with no adapter in it", peftkit.errors.AdapterFileError, "adapter",
     lambda m, tmp: peftkit.load(m, tmp)),
    ("quantizing with an unknown scheme", peftkit.PeftkitError, "nf4",
     lambda m, _: peftkit.quantize(m, "nf5")),
]


@pytest.mark.parametrize("what,error,message,mistake", MISTAKES, ids=[row[0] for row in MISTAKES])
def test_user_mistake_is_a_clear_error_and_changes_nothing(tmp_path, what, error, message, mistake):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(error) as raised:
        mistake(model, tmp_path)
    text = str(raised.value)
    assert message.lower() in text.lower(), f"{what}: message does not help: {text}"
    assert len(text) > 30, f"{what}: message too terse: {text}"
    assert not any(isinstance(m, peftkit.TunedModel) for m in model.modules())
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
