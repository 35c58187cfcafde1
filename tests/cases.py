"""The contract-suite table: which (method, model, options) cases run through the shared checks.

Every registered method runs with its default options on every transformer model below, so a
new method joins the suite by being registered. Add variants or plain-module options here.
"""

from __future__ import annotations

import pytest

import peftkit

TRANSFORMERS = ("bert", "llama", "gpt2")

VARIANTS: dict[str, list[dict]] = {
    "lora": [{}, {"rslora": True, "r": 4}, {"dora": True}, {"targets": "all-linear", "bias": "lora_only"}],
    "adalora": [{"total_steps": 20}, {"total_steps": 20, "init_r": 4, "target_r": 2, "targets": "all-linear"}],
    "bitfit": [{}, {"biases": ["ffn_in", "attn_out"], "layers": "-1:"}],
    "layer_tuning": [{}],
    "compose": [
        {"parts": [{"method": "lora"}, {"method": "ln_tuning", "layers": [1]}, {"method": "layer_tuning", "layers": [0]}]},
        {"parts": [{"method": "lora", "r": 2}, {"method": "sparse_adapter", "base": "lora", "score": "random"}],
         "gates": True},
    ],
    "sparse_adapter": [
        {"score": "magnitude", "sparsity": 0.8},
        {"base": "parallel_adapter", "score": "random", "scope": "per-layer", "base_options": {"bottleneck": 8}},
    ],
    # additive family
    "adapter": [{}, {"placement": "pfeiffer", "reduction_factor": 4, "activation": "gelu"}],
    "parallel_adapter": [{}, {"targets": "all-linear", "bottleneck": 4, "scale": 1.0}],
    "ia3": [{}, {"targets": "all-linear", "layers": [1]}],
    "prompt_tuning": [{}, {"init": "random", "num_virtual_tokens": 3}],
    "p_tuning": [{}, {"encoder": "lstm", "num_virtual_tokens": 3, "encoder_hidden": 8}],
    "prefix_tuning": [{}, {"reparam_hidden": 0, "num_virtual_tokens": 3}],
}

# Methods that support only some of the transformer models (BitFit: Llama has no bias terms).
MODELS: dict[str, tuple[str, ...]] = {
    "bitfit": ("bert", "gpt2"),
    "head_only": ("bert",),  # only a classifier has a task head; language models are refused (test_partial.py)
    # qlora quantizes the base when it attaches, so these checks' full-precision reference does not
    # apply; tests/test_quant_methods.py runs the same checks against the quantized base.
    "qlora": (),
}

# Options that make a method work on the plain nn.Module of models.PlainNet (no transformer structure).
PLAIN: dict[str, dict] = {
    "lora": {"targets": ["fc1", "fc2", "embed"]},
    "adalora": {"targets": ["fc1", "fc2"], "total_steps": 20},
    "bitfit": {},
    "layer_tuning": {"last_k": 0, "targets": ["fc2"]},
    "compose": {"parts": [{"method": "lora", "targets": ["fc1"]}, {"method": "bitfit", "biases": ["fc2"]}]},
    "sparse_adapter": {"base": "lora", "score": "random", "base_options": {"targets": ["fc1", "fc2"]}},
    "adapter": {"targets": ["fc1", "fc2"], "train_norms": False},
    "parallel_adapter": {"targets": ["fc1", "fc2"]},
    "ia3": {"targets": ["fc1", "fc2"], "feedforward": ["fc2"]},
}


def contract_cases() -> list:
    out = []
    for method in peftkit.methods():
        for i, options in enumerate(VARIANTS.get(method, [{}])):
            for model in MODELS.get(method, TRANSFORMERS):
                out.append(pytest.param(method, model, options, id=f"{method}{i}-{model}"))
        if method in PLAIN:
            out.append(pytest.param(method, "plain", PLAIN[method], id=f"{method}-plain"))
    return out
