"""core.dropout: masks from 16 random bits per entry, `FastDropout` against plain dropout with the same
mask, and the switch that swaps a model's dropout layers while a block runs (and what the trainer does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.core.dropout import LEVELS, FastDropout, fast_dropout, keep_levels, new_seed, random_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_generated_masks_keep_the_asked_share_at_every_position(p):
    """16 random bits per entry, four entries per int64: no position (of the four) may be favoured."""
    x = torch.empty(1000, 999)
    mask = random_mask(x, keep_levels(p), seed=3).float()
    keep, sd = 1 - p, (p * (1 - p) / mask.numel()) ** 0.5
    assert mask.shape == x.shape
    assert abs(mask.mean().item() - keep) < 5 * sd
    for k in range(4):  # entries taken from each word's first … fourth 16-bit chunk
        share = mask.reshape(-1)[k::4].mean().item()
        assert abs(share - keep) < 5 * sd * 2
    assert torch.equal(random_mask(x, keep_levels(p), seed=3).float(), mask)  # the same seed, the same mask
    assert not torch.equal(random_mask(x, keep_levels(p), seed=4).float(), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_is_plain_dropout_with_its_mask(dtype):
    """Output and input gradient are those of ``x · mask / keep`` for the mask drawn from the seed that
    torch's generator gave, in the input's dtype."""
    x = torch.randn(4, 7, 33, dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 7, 33, dtype=dtype)
    torch.manual_seed(11)
    out = FastDropout(0.3).train()(x)
    out.backward(grad)
    torch.manual_seed(11)
    mask = random_mask(x, keep_levels(0.3), new_seed())
    scale = LEVELS / keep_levels(0.3)
    assert out.dtype == dtype
    torch.testing.assert_close(out, x.detach() * mask * scale)
    torch.testing.assert_close(x.grad, grad * mask * scale)
    assert 0.55 < mask.float().mean().item() < 0.85


def test_fast_dropout_outside_training_and_at_the_edges():
    x = torch.randn(3, 5)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_the_switch_swaps_dropout_layers_and_puts_them_back_however_the_block_ends():
    class Custom(nn.Dropout):  # a subclass may behave differently: left alone
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), Custom(0.3)), nn.Dropout(0.0))
    originals = [model[1], model[2][0], model[2][1], model[3]]
    with fast_dropout(model) as swapped:
        assert swapped == 2
        assert isinstance(model[1], FastDropout) and model[1].p == 0.1 and isinstance(model[2][0], FastDropout)
        assert model[2][1] is originals[2] and model[3] is originals[3]
        assert model.state_dict().keys() == {"0.weight", "0.bias"}
        model.eval()  # a mode change inside the block survives it
    assert [model[1], model[2][0], model[2][1], model[3]] == originals
    assert not model[1].training
    with pytest.raises(RuntimeError), fast_dropout(model):
        raise RuntimeError("a failed step")
    assert [model[1], model[2][0], model[2][1], model[3]] == originals


@pytest.mark.parametrize("fast", [True, False])
def test_the_trainer_draws_the_models_dropout_with_it_unless_told_not_to(tmp_path, bert_dir, sentiment_csv,
                                                                         monkeypatch, fast):
    from test_train_loop import run

    from peftkit.core import dropout

    calls: list[int] = []
    real = dropout._Dropout.forward
    monkeypatch.setattr(dropout._Dropout, "forward", staticmethod(lambda ctx, x, p: calls.append(1) or real(ctx, x, p)))
    result = run(tmp_path / "r", bert_dir, sentiment_csv, max_steps=3, base_dropout=0.1, fast_dropout=fast)
    assert (len(calls) > 0) == fast
    assert result["metrics"]["loss"] > 0
