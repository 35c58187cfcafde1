"""Numerical guards of the training loop: a NaN or infinite loss, gradient or weight stops the run with
`Diverged` naming the step and the fix, before the step's update; nothing is saved from it (the last
checkpoint stays, no adapter is written) and --resume continues from the checkpoint. Gradient clipping
is on by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit.core.tuned import TunedModel
from peftkit.errors import PeftkitError
from peftkit.train import checkpoint as ckpt
from peftkit.train.config import TrainConfig
from peftkit.train.run import train
from peftkit.train.trainer import Diverged


def run(out: Path, model: Path, data: Path, **options) -> dict:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=8, max_steps=8, lr=5e-3, save_every=2,
                progress=False, eval_fraction=0.25, seed=1)
    return train(TrainConfig(**{**base, **options}), echo=lambda _s: None)


class NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with NaN gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def inject(monkeypatch, at: int, poison) -> None:
    """Apply `poison` to the loss of the `at`-th training forward pass (1-based: one per step here)."""
    real, calls = TunedModel.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled() and self.training and getattr(out, "loss", None) is not None:
            calls.append(1)
            if len(calls) == at:
                out.loss = poison(out.loss)
        return out

    monkeypatch.setattr(TunedModel, "forward", forward)


def saved_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors"))


@pytest.mark.parametrize("poison,what", [
    (lambda loss: loss * float("inf"), "loss became inf"),
    (lambda loss: loss * float("nan"), "loss became nan"),
    (NanGradient.apply, "gradient norm became nan"),
])
def test_a_non_finite_step_stops_training_and_keeps_the_last_checkpoint(poison, what, tmp_path, bert_dir,
                                                                        sentiment_csv, monkeypatch) -> None:
    out = tmp_path / "run"
    inject(monkeypatch, at=5, poison=poison)
    with pytest.raises(Diverged, match=rf"diverged at step 5: the {what}\. Nothing from this step was applied or "
                                       r"saved; the last checkpoint \(.*checkpoint, step 4\) is kept and --resume "
                                       r"continues from it\. Lower --lr \(now 0.005\)") as stopped:
        run(out, bert_dir, sentiment_csv)
    assert stopped.value.step == 5 and isinstance(stopped.value, PeftkitError) and "\n" not in str(stopped.value)
    assert ckpt.verify(out / "checkpoint")["step"] == 4  # whole, finite, not overwritten
    assert not (out / "adapter").exists()  # no adapter from bad weights


def test_resuming_past_a_bad_step_gives_the_undisturbed_run(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    """The kept checkpoint is the good state before the bad step: once the cause is gone (here the
    injected NaN gradient; in practice a lower --lr or fixed data), --resume ends where a run that
    never met it ends, bit for bit."""
    out = tmp_path / "run"
    inject(monkeypatch, at=5, poison=NanGradient.apply)
    with pytest.raises(Diverged):
        run(out, bert_dir, sentiment_csv)
    monkeypatch.undo()
    assert run(out, bert_dir, sentiment_csv, resume="auto")["steps"] == 8
    run(tmp_path / "clean", bert_dir, sentiment_csv)
    a, b = saved_adapter(out / "adapter"), saved_adapter(tmp_path / "clean" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_huge_learning_rate_is_stopped_before_anything_bad_is_saved(tmp_path, bert_dir, sentiment_csv) -> None:
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"diverged at step \d+: the .*Lower --lr \(now 1e\+30\)"):
        run(out, bert_dir, sentiment_csv, lr=1e30, max_steps=20, save_every=1)
    assert not (out / "adapter").exists()
    if (out / "checkpoint").exists():
        ckpt.verify(out / "checkpoint")  # whatever was saved is finite


def test_without_clipping_the_message_says_to_turn_it_back_on(tmp_path, bert_dir, sentiment_csv, monkeypatch) -> None:
    inject(monkeypatch, at=1, poison=lambda loss: loss * float("nan"))
    with pytest.raises(Diverged, match=r"step 1: .*no checkpoint had been written yet.*--max-grad-norm 1\.0"):
        run(tmp_path / "run", bert_dir, sentiment_csv, max_grad_norm=0.0)


def test_gradient_clipping_is_on_by_default() -> None:
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["max_grad_norm"]
    assert TrainConfig().max_grad_norm == 1.0 and "1.0" in field.metadata["help"]
