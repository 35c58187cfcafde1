"""SparseAdapter: exact density, masks fixed through training, data-driven scores, compact files."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS, PlainNet, batch, output_tensor
from safetensors.torch import load_file

import peftkit
from peftkit.core.forms.mask import MaskedDelta, pack_mask, unpack_mask
from peftkit.methods.unified import scores as S
from peftkit.methods.unified.sparse_adapter import masked_deltas

LORA = {"base": "lora", "base_options": {"r": 4, "targets": "all-linear"}}


def _masks(tuned, name="default"):
    return [(d, n) for d in masked_deltas(tuned, name) for n in d.prunable]


def _calibrated(model_name, **options):
    tuned = peftkit.attach(BUILDERS[model_name](), peftkit.config("sparse_adapter", **{**LORA, **options}))
    if tuned.needs_calibration:
        tuned.calibrate([batch(model_name, seed=s) for s in (11, 12)])
    return tuned


@pytest.mark.parametrize("score,scope", [("magnitude", "global"), ("random", "per-layer"), ("snip", "global"),
                                         ("grasp", "per-layer")])
def test_masks_keep_exactly_the_asked_density(score, scope):
    sparsity = 0.7
    options = {"score": score, "scope": scope, "sparsity": sparsity}
    if score in ("magnitude", "snip", "grasp"):
        options["params"] = "A"  # LoRA's B starts at zero: weight-based scores cannot rank it
    tuned = _calibrated("bert", **options)
    pairs = _masks(tuned)
    sizes = [d.mask(n).numel() for d, n in pairs]
    kept = [int(d.mask(n).sum()) for d, n in pairs]
    if scope == "global":
        assert sum(kept) == round(sum(sizes) * (1 - sparsity))
    else:
        assert kept == [round(s * (1 - sparsity)) for s in sizes]
    for d, n in pairs:
        assert d.kept_values(n).numel() == int(d.mask(n).sum())
        assert torch.equal(d.dense(n)[~d.mask(n)], torch.zeros(int((~d.mask(n)).sum())))
    dense_rest = sum(p.numel() for d in masked_deltas(tuned, "default")
                     for name, p in d.inner.named_parameters() if "parametrizations" not in name)
    assert tuned.summary().trainable_without_head == sum(kept) + dense_rest  # removed weights are not parameters


def test_masked_weights_stay_exactly_zero_through_training():
    inputs = batch("bert")
    tuned = _calibrated("bert", score="random", sparsity=0.6)
    pairs = _masks(tuned)
    masks = [d.mask(n).clone() for d, n in pairs]
    start = [d.dense(n).detach().clone() for d, n in pairs]
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    tuned.train()
    for _ in range(6):
        optimizer.zero_grad()
        tuned(**inputs).loss.backward()
        optimizer.step()
    for (d, n), mask, before in zip(pairs, masks, start, strict=True):
        after = d.dense(n).detach()
        assert torch.equal(d.mask(n), mask), "the mask moved"
        assert torch.count_nonzero(after[~mask]) == 0
        assert not torch.equal(after[mask], before[mask])


def test_snip_waits_for_data_then_matches_its_definition():
    model = PlainNet()
    config = peftkit.config("sparse_adapter", base="lora", base_options={"targets": ["fc1", "fc2"], "r": 4,
                                                                         "init": "random"},
                            score="snip", sparsity=0.5)
    tuned = peftkit.attach(model, config)
    inputs = batch("plain")
    assert tuned.needs_calibration == ["default"]
    with pytest.raises(peftkit.errors.AdapterStateError, match="calibrate"):
        tuned(**inputs)
    dense = {f"{i}/{n}": d.dense(n).detach().clone() for i, d in enumerate(masked_deltas(tuned, "default"))
             for n in d.prunable}

    def loss_fn(outputs, batch_):
        return outputs.float().pow(2).mean()

    # |g ⊙ w| by hand, on the dense adapter
    values = [d.kept_values(n) for d in masked_deltas(tuned, "default") for n in d.prunable]
    for v in values:
        v.requires_grad_(True)
    deltas = masked_deltas(tuned, "default")
    for d in deltas:
        d.calibrating = True
    grads = torch.autograd.grad(loss_fn(tuned(**inputs), None), values)
    for d in deltas:
        d.calibrating = False
    scores = {k: (g.view(w.shape) * w).abs() for (k, w), g in zip(dense.items(), grads, strict=True)}
    expected = S.select_masks(scores, 0.5, "global", 0)
    tuned.calibrate([inputs], loss_fn=loss_fn)
    assert tuned.needs_calibration == []
    got = {f"{i}/{n}": d.mask(n) for i, d in enumerate(deltas) for n in d.prunable}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    tuned(**inputs)  # runs now


def test_grasp_hessian_gradient_matches_double_backward():
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(7, 4)

    def loss():
        return torch.tanh(x @ w.T).pow(2).sum()

    g = torch.autograd.grad(loss(), w, create_graph=True)[0]
    exact = torch.autograd.grad((g * g.detach()).sum(), w)[0]
    approx = S.hessian_gradient([w], [g.detach()], lambda: torch.autograd.grad(loss(), [w]))[0]
    torch.testing.assert_close(approx, exact, atol=1e-3, rtol=1e-2)


def test_file_stores_kept_values_and_packed_mask(tmp_path):
    sizes = {}
    for sparsity in (0.0, 0.5, 0.9):
        tuned = _calibrated("bert", score="random", sparsity=sparsity, trainable_modules=None)
        tuned.save(tmp_path / str(sparsity))
        tensors = load_file(tmp_path / str(sparsity) / "adapter.safetensors")
        kept = sum(v.numel() for k, v in tensors.items() if k.endswith(".kept"))
        total = sum(d.mask(n).numel() for d, n in _masks(tuned))
        assert kept == round(total * (1 - sparsity))
        assert all(v.dtype == torch.uint8 for k, v in tensors.items() if k.endswith(".mask"))
        data = sum(v.numel() * v.element_size() for v in tensors.values())
        assert data == 4 * kept + sum((d.mask(n).numel() + 7) // 8 for d, n in _masks(tuned))  # fp32 + 1 bit/weight
        sizes[sparsity] = (tmp_path / str(sparsity) / "adapter.safetensors").stat().st_size
    assert sizes[0.9] < sizes[0.5] < sizes[0.0]


def test_load_restores_masks_from_the_file_not_from_init(tmp_path):
    inputs = batch("bert")
    tuned = _calibrated("bert", score="snip", sparsity=0.8, params="A")
    expected = output_tensor(tuned(**inputs)).detach()
    tuned.save(tmp_path / "a")
    loaded = peftkit.load(BUILDERS["bert"](), tmp_path / "a")  # re-attach prunes nothing: masks come from the file
    assert torch.equal(output_tensor(loaded(**inputs)).detach(), expected)
    assert all(torch.equal(a.mask(n), b.mask(n)) for (a, n), (b, _) in zip(_masks(tuned), _masks(loaded), strict=True))


def test_large_sparse_has_the_dense_budget():
    dense = peftkit.attach(BUILDERS["bert"](), peftkit.config("lora", r=4, targets="all-linear",
                                                              trainable_modules=None))
    large = peftkit.attach(BUILDERS["bert"](), peftkit.config(
        "sparse_adapter", base="lora", base_options={"r": 8, "targets": "all-linear"}, sparsity=0.5, score="random",
        trainable_modules=None))
    assert large.summary().trainable == dense.summary().trainable


def test_pack_roundtrip_and_config_errors():
    for shape in [(1,), (3, 5), (8, 8), (2, 3, 7)]:
        mask = torch.rand(shape) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(peftkit.errors.ConfigError, match="removed"):
        peftkit.config("sparse_adapter", base="lora", sparsity=1.2)
    with pytest.raises(peftkit.errors.ConfigError, match="lora"):
        peftkit.config("sparse_adapter", base="lroa")
    with pytest.raises(peftkit.errors.ConfigError, match="base_options"):
        peftkit.config("sparse_adapter", base="lora", base_options={"rank": 4})


def test_a_mask_wraps_a_delta_without_changing_what_it_is():
    from torch import nn

    from peftkit.methods.reparameterized.adalora import AdaLoraLinear
    from peftkit.methods.reparameterized.lora import LoraLinear

    inner = LoraLinear(nn.Linear(6, 4), r=2, scaling=1.0, dropout=0.0, dora=False, init="random")
    masked = MaskedDelta(inner, ["A", "B"])
    assert masked.hooks == inner.hooks and masked.mergeable and masked.form == "mask"
    x = torch.randn(3, 6)
    torch.testing.assert_close(masked.contribution(x, nn.Identity(), x), inner.contribution(x, nn.Identity(), x))
    adalora = AdaLoraLinear(nn.Linear(6, 4), r=2, scaling=1.0, dropout=0.0, orth_weight=0.0)
    with pytest.raises(peftkit.errors.ConfigError, match="its own way"):  # pruned ranks: not a plain state_dict
        MaskedDelta(adalora, ["A"])


def test_two_sparse_parts_in_one_adapter_keep_their_own_settings():
    parts = [{"method": "sparse_adapter", "base": "lora", "score": "snip", "sparsity": 0.5, "params": "A"},
             {"method": "sparse_adapter", "base": "parallel_adapter", "score": "snip", "sparsity": 0.9,
              "base_options": {"bottleneck": 8}}]
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config("compose", parts=parts))
    assert tuned.needs_calibration == ["default"]
    tuned.calibrate([batch("bert")])
    for part in tuned.config_of("default").parts:
        pairs = [(d, n) for d in masked_deltas(tuned, "default", part) for n in d.prunable]
        total = sum(d.mask(n).numel() for d, n in pairs)
        assert sum(int(d.mask(n).sum()) for d, n in pairs) == round(total * (1 - part.sparsity))
