"""core.dropout: masks from 15 random bits per entry applied as a bitwise AND, `FastDropout` against plain dropout with the same
mask, and the switch that swaps a model's dropout layers while a block runs (and what the trainer does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.core.dropout import LEVELS, FastDropout, fast_dropout, keep_levels, new_seed, random_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_generated_masks_keep_the_asked_share_at_every_position(p):
    """15 random bits per entry, four entries per int64: no position (of the four) may be favoured."""
    x = torch.empty(1000, 999)
    bits = random_mask(x, keep_levels(p), seed=3)
    assert bits.dtype == torch.int8 and set(bits.unique().tolist()) == {-1, 0}  # every bit set where kept
    mask = (bits == -1).float()
    keep, sd = 1 - p, (p * (1 - p) / mask.numel()) ** 0.5
    assert mask.shape == x.shape
    assert abs(mask.mean().item() - keep) < 5 * sd
    for k in range(4):  # entries taken from each word's first … fourth 16-bit chunk
        share = mask.reshape(-1)[k::4].mean().item()
        assert abs(share - keep) < 5 * sd * 2
    assert torch.equal(random_mask(x, keep_levels(p), seed=3), bits)  # the same seed, the same mask
    assert not torch.equal(random_mask(x, keep_levels(p), seed=4), bits)


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
    mask = random_mask(x, keep_levels(0.3), new_seed()) != 0
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
    sdpa_dropout: list[float] = []  # what SDPA was asked to draw itself (the attention probabilities)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, dropout_p=0.0, **kw: sdpa_dropout.append(dropout_p) or sdpa(*a, dropout_p=dropout_p, **kw))
    result = run(tmp_path / "r", bert_dir, sentiment_csv, max_steps=3, base_dropout=0.1, fast_dropout=fast)
    assert (len(calls) > 0) == fast
    assert any(p > 0 for p in sdpa_dropout) != fast  # with it, SDPA only runs without dropout (evaluation)
    assert result["metrics"]["loss"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zeroing_by_the_mask_keeps_every_kept_value_bit_for_bit(dtype):
    """The AND with the mask leaves kept entries exactly as they were (NaN, inf and -0.0 included) and
    zeroes the others, in every float width."""
    from peftkit.core.dropout import from_bool, zero_dropped

    x = torch.randn(5, 64, dtype=torch.float64).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    keep = torch.rand(5, 64) < 0.7
    keep[0, :4] = True
    out = zero_dropped(x, from_bool(keep))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.view(torch.uint8)[keep.repeat_interleave(x.element_size(), -1)],
                       x.view(torch.uint8)[keep.repeat_interleave(x.element_size(), -1)])
    assert (out[~keep] == 0).all()
    transposed = zero_dropped(x.T, from_bool(keep.T))  # any strides
    assert torch.equal(transposed.T.view(torch.uint8), out.view(torch.uint8))


@pytest.mark.parametrize("p", [1e-6, 0.5, 1 - 1e-6])
def test_a_mask_at_the_ends_of_the_range_never_overflows(p):
    """The threshold arithmetic stays inside int16 for every keep share: nearly all kept, nearly all dropped."""
    x = torch.empty(200_000)
    levels = keep_levels(p)
    kept = (random_mask(x, levels, seed=1) == -1).float().mean().item()
    assert abs(kept - levels / LEVELS) < 0.01
