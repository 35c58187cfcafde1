"""Quantized storage: code books, error bounds, sizes, the QuantLinear layer and `peftkit.quantize`."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, batch, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import peftkit
from peftkit.core.linear import Conv1D
from peftkit.quant import FP4, NF4, QuantLinear, QuantSpec, footprint, formats, nf4_from_quantiles, quantize
from peftkit.quant.codes import dynamic_map

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="optional bitsandbytes not installed (pip install 'peftkit[bnb]')")

# QLoRA paper, appendix E (float32 values, as printed there and used by bitsandbytes).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_table_is_the_papers():
    assert torch.equal(torch.tensor(NF4), torch.tensor(PAPER_NF4, dtype=torch.float32))
    # ... and what the paper's construction (normal quantiles, offset 0.9677083) gives.
    rebuilt = torch.tensor(nf4_from_quantiles(), dtype=torch.float64)
    assert (rebuilt - torch.tensor(PAPER_NF4, dtype=torch.float64)).abs().max() < 2e-7
    assert NF4[7] == 0.0 and len(set(NF4)) == 16 and list(NF4) == sorted(NF4)


def test_fp4_and_dynamic_map():
    assert len(FP4) == 16 and max(FP4) == 1.0 and min(FP4) == -1.0
    assert all(FP4[i] == -FP4[i + 8] for i in range(8))  # code bit 3 is the sign
    code = dynamic_map()
    assert code.shape == (256,) and torch.equal(code, code.sort().values)
    assert {0.0, 1.0} <= set(code.tolist()) and code.min() > -1.0


@needs_bnb
def test_codes_and_4bit_bytes_match_bitsandbytes():
    import bitsandbytes.functional as bf

    assert torch.equal(dynamic_map(), bf.create_dynamic_map())
    for kind in ("nf4", "fp4"):
        assert torch.equal(torch.tensor(dict(nf4=NF4, fp4=FP4)[kind]), bf.get_4bit_type(kind, device="cpu"))
        w = torch.randn(96, 200) * 0.02  # 19200 values: 300 blocks of 64
        packed, absmax = formats.quantize_4bit(w, kind, 64)
        theirs, state = bf.quantize_4bit(w, blocksize=64, quant_type=kind)
        assert torch.equal(packed, theirs.view(-1)) and torch.equal(absmax, state.absmax)


def _rel_rms(w: torch.Tensor, deq: torch.Tensor) -> float:
    return ((w - deq).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()


def _int4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Plain symmetric int4 (levels -7..7) with the same blockwise absmax, for comparison."""
    blocks = w.reshape(-1, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    return (torch.round(blocks / scale).clamp(-7, 7) * scale).view_as(w)


def _roundtrip(w: torch.Tensor, scheme: str, double_quant: bool = True) -> torch.Tensor:
    layer = QuantLinear(w.shape[1], w.shape[0], QuantSpec(scheme, double_quant))
    layer.load_dequantized_weight(w)
    return layer.dequantized_weight()


def test_error_bounds_on_gaussian_weights():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    errors = {s: _rel_rms(w, _roundtrip(w, s)) for s in ("nf4", "fp4", "int8")}
    errors["int4"] = _rel_rms(w, _int4(w))
    # NF4 is information-theoretically matched to N(0, 1): lowest error of the 4-bit formats.
    assert 0.085 < errors["nf4"] < 0.10, errors
    assert errors["nf4"] < errors["int4"] and errors["nf4"] < errors["fp4"], errors
    assert errors["int8"] < 0.01, errors
    # Hard bound without double quantization: each value lands within half the widest code gap.
    deq = _roundtrip(w, "nf4", double_quant=False)
    half_gap = max(b - a for a, b in zip(NF4[:-1], NF4[1:], strict=True)) / 2
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert ((w - deq).reshape(-1, 64).abs() <= half_gap * absmax * (1 + 1e-6)).all()
    # Double quantization adds (almost) nothing.
    assert abs(_rel_rms(w, deq) - errors["nf4"]) < 1e-3


@pytest.mark.parametrize("double_quant,expected", [(True, 0.5 + 1 / 64 + 16 / 65536 + 4 / 65536),
                                                   (False, 0.5 + 4 / 64)])
def test_bytes_per_param(double_quant, expected):
    # (256, 256) = 65536 weights: 1024 blocks of 64, 4 double-quant blocks of 256, one offset
    layer = QuantLinear.from_module(nn.Linear(256, 256, bias=False), QuantSpec("nf4", double_quant))
    assert layer.storage_bytes() / layer.weight_numel == pytest.approx(expected, abs=1e-9)
    if double_quant:
        assert layer.storage_bytes() / layer.weight_numel <= 0.52  # QLoRA: 4.127 bits per weight


def test_layer_forward_backward_match_dequantized_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = QuantLinear.from_module(linear, QuantSpec("nf4"))
    w = layer.dequantized_weight()
    assert w.shape == (48, 64) and w.dtype == torch.float32
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g @ w), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_layer_dtypes_and_storage_survive_casts():
    layer = QuantLinear.from_module(nn.Linear(64, 32), QuantSpec("nf4"), compute_dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    y = layer(torch.randn(2, 64))
    assert y.dtype == torch.float32  # computed in bf16, returned in the input dtype
    layer.half()
    assert {k: v.dtype for k, v in layer.state_dict().items() if k != "bias"} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    fresh = QuantLinear(64, 32, QuantSpec("nf4"), bias=torch.zeros(32))
    fresh.load_state_dict(layer.float().state_dict())
    torch.testing.assert_close(fresh.dequantized_weight(), layer.dequantized_weight(torch.float32))


def test_conv1d_is_quantized_with_its_layout():
    conv = Conv1D(24, 16)  # x @ W + b with W (in=16, out=24)
    nn.init.normal_(conv.weight)
    layer = QuantLinear.from_module(conv, QuantSpec("int8"))
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), conv(x), atol=0.05, rtol=0.02)
    back = layer.dequantized_module()
    assert isinstance(back, Conv1D) and back.weight.shape == (16, 24)
    torch.testing.assert_close(back(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("builder,name", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_quantize_model(builder, name):
    model = builder()
    inputs = {k: v for k, v in batch(name).items() if k != "labels"}
    reference = model(**inputs).logits
    assert peftkit.quantize(model, "nf4") is model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(isinstance(m, nn.Linear | Conv1D) and m is not model.get_output_embeddings()
                              and "classifier" not in n for n, m in model.named_modules())
    out = model(**inputs).logits
    assert 0 < (out - reference).abs().max() < 0.25 * reference.abs().max()
    report = footprint(model)
    assert report.layers == len(layers) and report.bytes_per_param < 0.53  # tiny layers: padding blocks
    assert report.full_bytes == 4 * report.weights


def test_quantize_options_and_errors():
    model = tiny_llama()
    quantize(model, "int8", targets=["q_proj", "v_proj"], exclude="re:.*\\.1\\..*")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    quantize(model, "nf4")  # the rest; the int8 layers are left as they are
    assert model.model.layers[0].self_attn.q_proj.spec.scheme == "int8"
    assert model.model.layers[1].self_attn.q_proj.spec.scheme == "nf4"
    with pytest.raises(peftkit.errors.ConfigError, match="scheme must be one of"):
        quantize(tiny_llama(), "nf3")
    with pytest.raises(peftkit.errors.ConfigError, match="blocksize"):
        quantize(tiny_llama(), "nf4", blocksize=48)
    with pytest.raises(peftkit.errors.ConfigError, match="compute_dtype"):
        quantize(tiny_llama(), "nf4", compute_dtype="int8")
    with pytest.raises(peftkit.errors.TargetError, match="matches no module"):
        quantize(tiny_llama(), "nf4", targets=["q_prj"])
    with pytest.raises(peftkit.errors.TargetError, match="share their weight"):
        quantize(tiny_llama(), "nf4", targets=["lm_head"])


def test_bitsandbytes_backend_missing_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(peftkit.errors.ConfigError, match="pip install 'peftkit\\[bnb\\]'"):
        quantize(tiny_llama(), "nf4", backend="bitsandbytes")


@needs_bnb
@pytest.mark.parametrize("scheme,double_quant", [("nf4", True), ("fp4", False)])
def test_backends_read_each_others_storage(scheme, double_quant):
    w = torch.randn(40, 96) * 0.05  # 3840 weights: a partial double-quant block
    spec_t, spec_b = QuantSpec(scheme, double_quant), QuantSpec(scheme, double_quant, backend="bitsandbytes")
    torch_layer, bnb_layer = QuantLinear(96, 40, spec_t), QuantLinear(96, 40, spec_b)
    torch_layer.load_dequantized_weight(w)
    bnb_layer.load_dequantized_weight(w)
    assert torch.equal(torch_layer.qweight, bnb_layer.qweight)  # identical 4-bit codes
    for a, b in ((torch_layer, bnb_layer), (bnb_layer, torch_layer)):
        swapped = QuantLinear(96, 40, b.spec)
        swapped.load_state_dict(a.state_dict())
        torch.testing.assert_close(swapped.dequantized_weight(), a.dequantized_weight(), rtol=0, atol=1e-7)
    assert _rel_rms(w, bnb_layer.dequantized_weight()) == pytest.approx(_rel_rms(w, torch_layer.dequantized_weight()),
                                                                        rel=0.02)


def test_quantized_model_moves_and_trains_in_bf16_compute():
    model = tiny_llama()
    quantize(model, "nf4", compute_dtype="bfloat16")
    tuned = peftkit.attach(model, peftkit.config("lora", targets="all-linear"))
    out = tuned(input_ids=torch.randint(3, VOCAB, (2, 6)), labels=torch.randint(3, VOCAB, (2, 6)))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in tuned.trainable_parameters())
